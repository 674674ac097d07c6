"""`compactmind export`: re-apply a study's trial to the original model (same calibration data and seed; a dynamic
trial's profile assembled from its level database), refuse it when the model or data changed, write it in one of
the deployment formats (deploy.FORMATS), and optionally load the written folder back and re-measure it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compactmind import deploy, packed
from compactmind.config import RunConfig
from compactmind.errors import ConfigError
from compactmind.files import atomic_write
from compactmind.study.records import TrialStatus

log = logging.getLogger(__name__)


def pick_trial(records, which: str):
    """The trial `--trial` names: 'best' or a number, with a measured pipeline."""
    if which == "best":
        if records.best is None:
            raise ConfigError(f"Study {records.study} has no feasible trial (ratio >= {records.target_ratio}); "
                              "pass --trial NUMBER (see 'compactmind best --pareto').")
        return records.best
    if not which.isdigit():
        raise ConfigError(f"--trial {which!r} is neither 'best' nor a trial number.")
    found = records.trial(int(which))
    if found is None:
        raise ConfigError(f"Study {records.study} has no trial {which} (it has {len(records.trials)} trials).")
    measured = (TrialStatus.OK, TrialStatus.INFEASIBLE, TrialStatus.EARLY_STOPPED, TrialStatus.OVER_CAP)
    if not found.pipeline or found.status not in {s.value for s in measured}:
        raise ConfigError(f"Trial {which} of study {records.study} has no measured pipeline (status "
                          f"{found.status or found.state}); pick another with 'compactmind best --pareto'.")
    return found


def _methods_of(trial, records) -> list[list[str]]:
    """The method names of each pipeline the trial applies: a static trial's steps; a dynamic profile's chosen
    option of every unit (a level's steps, `drop` for a removed block or sub-block, and the method an embedding
    unit's own option stands for: fp16, rtn, or gguf for a llama.cpp type)."""
    from compactmind import pipeline as pl
    from compactmind.dynamic import option_methods

    if trial.get("profile") is None:
        return [[s.method for s in pl.parse(trial.pipeline).steps]]
    profile, dynamic = trial.get("profile"), records.dynamic or {}
    options = dynamic.get("options") or [dynamic.get("levels", [])] * len(profile)  # a study from before options
    return [option_methods(label) for label in sorted({options[u][i] for u, i in enumerate(profile)})]


def export_trial(local: RunConfig, which: str, out: Path, verify: bool, fmt: str = "packed") -> list[str]:
    """Re-apply a trial's pipeline to the study's model (same calibration data and seed), write the folder in
    `fmt` (packed, compressed-tensors, dense), and optionally reload it and re-measure its perplexity. Returns
    the lines to print."""
    from compactmind.study.session import joined_config, open_records

    writer = deploy.get(fmt).impl()
    study, records = open_records(local.storage, local.study_name)
    trial = pick_trial(records, which)
    refused = writer.refusal(_methods_of(trial, records))
    if refused:
        raise ConfigError(refused)
    cfg = joined_config(local)
    loaded, data, fp, dense_bytes = _rebuild(cfg, study, trial)
    figures = ("perplexity", "compression_ratio", "bits_per_weight", "sparsity", "model_bytes", "dtype", "status")
    manifest = {"study": records.study, "trial": trial.number, "pipeline": trial.pipeline,
                "steps": trial.get("steps"), "profile": trial.get("profile"),
                "levels": (records.dynamic or {}).get("levels"), "model": records.model, "data": records.data,
                "protocol": records.protocol, "target_ratio": records.target_ratio, "dense": records.dense,
                "trial_figures": {k: trial.get(k) for k in figures},
                "exported_figures": {"compression_ratio": fp.compression_ratio, "model_bytes": fp.model_bytes,
                                     "bits_per_weight": fp.bits_per_weight, "sparsity": fp.sparsity}}
    try:
        manifest = writer.write(loaded.model, loaded.tokenizer, out, manifest, cfg.baseline_bits)
    except OSError as exc:
        raise ConfigError(f"Cannot write the export folder {out}: {exc.strerror or exc}.") from None
    stored = manifest["stored_tensor_bytes"]
    lines = [f"exported trial {trial.number} ({trial.pipeline}) to {out}/",
             f"weights: {stored / 2**20:.2f} MiB stored = ratio {1 - stored / dense_bytes:.4f} against the dense "
             f"weights at {cfg.baseline_bits} bits ({dense_bytes / 2**20:.2f} MiB); recorded ratio "
             f"{fp.compression_ratio:.4f}" if fmt == "packed" else
             f"weights: {stored / 2**20:.2f} MiB stored in {fmt} (the study's ratio {fp.compression_ratio:.4f} counts "
             "the packed format's bytes)"]
    if verify:
        device = loaded.device
        del loaded  # free the compressed copy before loading the export
        lines.append(_verify(out, writer, manifest, trial, data.windows, cfg.batch_size, device, lines))
    return lines


def _rebuild(cfg: RunConfig, study, trial):
    """The study's model and data (refused when their content changed), compressed as the trial was."""
    from compactmind import pipeline as pl
    from compactmind.study.session import candidates_of, check_identity, study_identity
    from compactmind.executor import Executor, load

    loaded, data = load(cfg)
    candidates = candidates_of(cfg, loaded.model)
    check_identity(study, study_identity(loaded, data, cfg, candidates))
    executor = Executor(loaded, data, cfg.seed, cfg.baseline_bits, reusable=cfg.dynamic)
    log.info("re-applying trial %d: %s", trial.number, trial.pipeline)
    if cfg.dynamic:  # read (or rebuild) the study's level database, then assemble the trial's profile
        from compactmind.study.profiles import open_levels
        from compactmind.study.spaces import LevelSpace

        db = open_levels(cfg, executor, candidates)
        fp = executor.assemble(db, LevelSpace.profile_of(trial.params, [u.name for u in db.units])).footprint
    else:
        fp = executor.compress(pl.parse(trial.pipeline)).footprint
    if fp.model_bytes != trial.get("model_bytes"):
        log.warning("the re-applied pipeline takes %d bytes, the trial recorded %s", fp.model_bytes,
                    trial.get("model_bytes"))
    return loaded, data, fp, executor.reference.dense_bytes


def _verify(out: Path, writer, manifest: dict, trial, windows, batch_size: int, device, lines: list) -> str:
    from compactmind.evaluate import perplexity

    result = perplexity(writer.reload(out, device), windows, batch_size)
    manifest["verified_perplexity"] = result.perplexity
    atomic_write(out / packed.MANIFEST, json.dumps(manifest, indent=2, default=str))
    line = f"reloaded perplexity {result.perplexity:.4f} (trial: {trial.perplexity})"
    tolerance = writer.tolerance(manifest)
    if trial.perplexity is not None and abs(result.perplexity / trial.perplexity - 1) > tolerance:
        raise ExportMismatch(f"The exported model's perplexity {result.perplexity:.6g} differs from trial "
                             f"{trial.number}'s {trial.perplexity:.6g} by more than {tolerance:.0e} (relative): the "
                             "model, data or method is not what the study measured.", lines + [line])
    return line


class ExportMismatch(ConfigError):
    """--verify measured another perplexity than the trial's (the folder is written; the lines say what)."""

    def __init__(self, message: str, lines: list[str]):
        super().__init__(message)
        self.lines = lines
