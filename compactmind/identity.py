"""What a study is, by content and never by path, and the one fingerprint function everything keys on.

A study's identity names the model (its weights' sha256), the token ids of its evaluation windows, calibration
samples and selection windows, the protocol, the target, the objectives, the search space and settings, and the
versions of compactmind and of every method its candidates use: a method's `version` changes whenever what it
makes of a model changes (how it rounds, what it keeps), so a resumed study never mixes figures of two codes.
A resumed run, a joining worker, an export and a level database all compare identities (or key on them).
"""

from __future__ import annotations

import hashlib
import json

from compactmind.errors import StorageError


def fingerprint(parts) -> str:
    """A short, stable digest of any JSON-able value (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def method_versions(candidates) -> dict[str, int]:
    """The version of every method the candidate pipelines use."""
    from compactmind.registry import get_method

    names = sorted({s.method for c in candidates for s in c.steps})
    return {name: get_method(name).version for name in names}


def identity_of(loaded, data, cfg, candidates) -> dict:
    """The identity of a study over these candidates (pipelines, or a dynamic study's levels)."""
    from compactmind import __version__

    n_params = sum(p.numel() for p in loaded.model.parameters())
    source = loaded.source_info or {}
    return {
        "model": {"name": loaded.name, "parameters": n_params, "weights": loaded.fingerprint,
                  **({"source_format": source["format"], "source_bytes": source["bytes"],
                      "source_bits_per_weight": round(source["bits_per_weight"], 4)} if source else {})},
        "data": {k: data.info[k] for k in ("eval_ids", "calib_ids", "selection_ids", "windows", "calib_samples")
                 if k in data.info},
        "protocol": {"seq_len": data.seq_len, "windows": data.info["windows"], "dtype": str(loaded.dtype)[6:],
                     "data_samples": cfg.data_samples, "seed": cfg.seed, "baseline_bits": cfg.baseline_bits},
        "target_ratio": cfg.target_ratio,
        "objectives": list(cfg.objectives),
        "search_space": fingerprint([str(c) for c in candidates]),
        "search": {"strategy": cfg.strategy, "ppl_cap_factor": cfg.ppl_cap_factor, "early_stop": cfg.early_stop,
                   "dominance_margin": cfg.dominance_margin},
        "versions": {"compactmind": __version__, "methods": method_versions(candidates)},
        **({"dynamic": {"granularity": cfg.granularity, "fitness": cfg.fitness,
                        "selection_windows": cfg.selection_windows, "depth": cfg.depth,
                        "embedding_units": cfg.embedding_units, "offspring": cfg.offspring, "stages": cfg.stages,
                        "random_profiles": cfg.random_profiles}} if cfg.dynamic else {}),
    }


def default_name(identity: dict) -> str:
    return f"{identity['model']['name']}-{fingerprint(identity)}"


_NAMED = {"model.weights": "model weights (their content changed)",
          "data.eval_ids": "evaluation text (its tokens changed)",
          "data.calib_ids": "calibration text (its tokens changed)",
          "data.selection_ids": "selection text (its tokens changed)"}


def differences(stored: dict | None, now: dict, prefix: str = "") -> list[str]:
    """What differs between a stored identity and this run's, named for a person."""
    stored = stored or {}
    out = []
    for key in now:
        old, new, name = stored.get(key), now[key], f"{prefix}{key}"
        if fingerprint(old) == fingerprint(new):
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out += differences(old, new, f"{name}.")
        elif name in _NAMED:
            out.append(_NAMED[name])
        elif name.startswith("versions.methods.") or name == "versions.compactmind":
            what = name.rsplit(".", 1)[-1]
            out.append(f"version of {what} (the study: {old if old is not None else 'none recorded'}; this run: "
                       f"{new}; it now compresses differently, so old and new figures would mix)")
        else:
            out.append(f"{name} (the study: {_shown(old)}; this run: {_shown(new)})")
    return out


def _shown(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def check(stored: dict | None, now: dict, study_name: str) -> None:
    """Refuse a study made with other content, settings or code than this run's, naming what changed."""
    if stored is not None and fingerprint(stored) != fingerprint(now):
        raise StorageError(f"Study {study_name!r} was made with a different {'; '.join(differences(stored, now))}; "
                           "pass the same settings, or a new --study_name (or leave it out to get one keyed by these "
                           "settings).")
