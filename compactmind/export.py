"""Export: re-apply a trial's pipeline to the original model and write it in the packed format (packed.py).

Each weight is written exactly as its ledger entry's layout says (formats.layout), so the stored tensors take
exactly the bytes the trial's recorded size counts: integer codes and zero points bit-packed, FP16 scales,
kept-position bitmaps for sparse weights, FP16/BF16 for float casts, the model's dtype for untouched tensors.
Every packed tensor is checked to unpack to exactly the weight that was evaluated.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from compactmind import packed
from compactmind.config import RunConfig
from compactmind.errors import ConfigError
from compactmind.formats import entry, layout
from compactmind.footprint import parameters

log = logging.getLogger(__name__)

_FLOAT_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_FLOATS_BY_BITS = {16: (torch.float16, torch.bfloat16), 32: (torch.float32,)}


def _float_dtype(w: torch.Tensor, bits: int, name: str) -> torch.dtype:
    """The float dtype of `bits` bits that holds these values exactly."""
    for dtype in _FLOATS_BY_BITS[bits]:
        if torch.equal(w.to(dtype).float(), w):
            return dtype
    raise ConfigError(f"{name} is recorded at {bits} bits but its values are not exactly representable there; "
                      "it cannot be exported as evaluated.")


def pack_tensor(name: str, module: nn.Module, param: str, baseline_bits: int) -> tuple[dict, dict]:
    """(manifest entry, stored tensors) for one parameter, as its layout says."""
    w = getattr(module, param).detach().float().cpu()
    e = entry(module, param)
    fmt, plan = e.format, layout(w, e, baseline_bits)
    mask = (w != 0).reshape(-1) if plan.sparse else None
    spec = {"shape": list(w.shape), "bits": None, "group_size": 0, "zero_point": False, "sparse": plan.sparse,
            "act_quant": "per_token_int8" if e.act_quant else None}
    out = {} if mask is None else {f"{name}.mask": packed.pack_bits(mask.to(torch.uint8), 1)}
    if "codes" in plan.parts:
        bits, q = fmt.bits, e.qparams
        rows, cols = w.shape
        column_group = torch.arange(cols) // (fmt.group_size or cols) if q.column_group is None \
            else q.column_group.cpu().long()
        scale, zero = q.scale.float().cpu(), q.zero.float().cpu()
        s, z = scale[:, column_group], zero[:, column_group]
        codes = torch.clamp(torch.round(w / s) + z, 0, 2 ** bits - 1)
        if not torch.allclose(s * (codes - z), w, rtol=0, atol=1e-6 * float(scale.abs().max()) + 1e-12):
            raise RuntimeError(f"{name}: the weight is not on its recorded {bits}-bit grid (a later step changed it);"
                               " it cannot be packed.")
        flat = codes.reshape(-1).to(torch.uint8)
        out[f"{name}.codes"] = packed.pack_bits(flat if mask is None else flat[mask], bits)
        out[f"{name}.scale"] = q.scale.cpu().half().contiguous()
        if fmt.zero_point:
            out[f"{name}.zero"] = packed.pack_bits(q.zero.cpu().to(torch.uint8), bits)
        if q.column_group is not None:
            out[f"{name}.group_index"] = column_group.to(torch.int32)
        spec.update(bits=bits, group_size=fmt.group_size or 0, zero_point=fmt.zero_point,
                    dtype=_FLOAT_NAMES[getattr(module, param).dtype])  # the dtype the evaluated model held it in
    else:
        dtype = _float_dtype(w, fmt.bits or baseline_bits, name)
        spec["dtype"] = _FLOAT_NAMES[dtype]
        values = w.to(dtype)
        out[f"{name}.values" if mask is not None else name] = (values.reshape(-1)[mask] if mask is not None
                                                               else values).contiguous()
    stored = {k: t.numel() * t.element_size() for k, t in out.items()}
    expected = {(f"{name}.{part}" if part != "values" or mask is not None else name): n
                for part, n in plan.parts.items()}
    if stored != expected:
        raise RuntimeError(f"{name}: stored {stored} bytes, the accounting counts {expected}")
    return spec, out


def packed_state(model: nn.Module, baseline_bits: int) -> tuple[dict, dict]:
    """Manifest entries and stored tensors of every parameter (a tied weight once)."""
    specs, tensors = {}, {}
    for name, module, pname, _ in parameters(model):
        specs[name], out = pack_tensor(name, module, pname, baseline_bits)
        tensors.update(out)
    return specs, tensors


def write(model: nn.Module, tokenizer, out_dir: Path, manifest: dict, baseline_bits: int = 32) -> dict:
    """Write the folder atomically (a temporary sibling, then rename); returns the manifest written."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        specs, tensors = packed_state(model, baseline_bits)
        save_file(tensors, str(tmp / packed.WEIGHTS), metadata={"format": "compactmind-packed",
                                                                 "version": str(packed.FORMAT_VERSION)})
        config = model.config.to_dict()
        config.pop("_name_or_path", None)  # a path of the machine it was made on
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_compactmind.CompactModelForCausalLM"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.copyfile(Path(packed.__file__), tmp / "modeling_compactmind.py")
        manifest = {**manifest, "stored_tensor_bytes": stored_bytes(tensors),
                    "format": {"version": packed.FORMAT_VERSION, "dtype": _FLOAT_NAMES[next(model.parameters()).dtype],
                               "tensors": specs}}
        (tmp / packed.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        _user_permissions(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _user_permissions(folder: Path) -> None:
    """mkdtemp made the folder private: give it and its files the user's normal permissions (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def folder_bytes(folder: Path, names=(packed.WEIGHTS,)) -> int:
    return sum((Path(folder) / n).stat().st_size for n in names)


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
    if not found.pipeline or found.status not in ("ok", "infeasible", "early_stopped", "over_cap"):
        raise ConfigError(f"Trial {which} of study {records.study} has no measured pipeline (status "
                          f"{found.status or found.state}); pick another with 'compactmind best --pareto'.")
    return found


def export_trial(local: RunConfig, which: str, out: Path, verify: bool) -> list[str]:
    """Re-apply a trial's pipeline to the study's model (same calibration data and seed), write the folder, and
    optionally reload it and re-measure its perplexity. Returns the lines to print."""
    from compactmind import pipeline as pl
    from compactmind.evaluate import perplexity
    from compactmind.study.session import joined_config, open_records
    from compactmind.trial import Executor, load

    _, records = open_records(local.storage, local.study_name)
    trial = pick_trial(records, which)
    cfg = joined_config(local)
    loaded, data = load(cfg)
    executor = Executor(loaded, data, cfg.seed, cfg.baseline_bits, reusable=False)
    log.info("re-applying trial %d: %s", trial.number, trial.pipeline)
    fp = executor.compress(pl.parse(trial.pipeline)).footprint
    if fp.model_bytes != trial.get("model_bytes"):
        log.warning("the re-applied pipeline takes %d bytes, the trial recorded %s", fp.model_bytes,
                    trial.get("model_bytes"))
    figures = ("perplexity", "compression_ratio", "bits_per_weight", "sparsity", "model_bytes", "dtype", "status")
    manifest = {"study": records.study, "trial": trial.number, "pipeline": trial.pipeline,
                "steps": trial.get("steps"), "model": records.model, "data": records.data,
                "protocol": records.protocol, "target_ratio": records.target_ratio, "dense": records.dense,
                "trial_figures": {k: trial.get(k) for k in figures},
                "exported_figures": {"compression_ratio": fp.compression_ratio, "model_bytes": fp.model_bytes,
                                     "bits_per_weight": fp.bits_per_weight, "sparsity": fp.sparsity}}
    try:
        manifest = write(loaded.model, loaded.tokenizer, out, manifest, cfg.baseline_bits)
    except OSError as exc:
        raise ConfigError(f"Cannot write the export folder {out}: {exc.strerror or exc}.") from None
    dense_bytes = executor.reference.dense_bytes
    lines = [f"exported trial {trial.number} ({trial.pipeline}) to {out}/",
             f"weights: {manifest['stored_tensor_bytes'] / 2**20:.2f} MiB stored = ratio "
             f"{1 - manifest['stored_tensor_bytes'] / dense_bytes:.4f} against the dense weights at "
             f"{cfg.baseline_bits} bits ({dense_bytes / 2**20:.2f} MiB); recorded ratio {fp.compression_ratio:.4f}"]
    if verify:
        device, loaded, executor = loaded.device, None, None  # free the compressed copy before loading the export
        result = perplexity(packed.load(out, device=device), data.windows, cfg.batch_size)
        manifest["verified_perplexity"] = result.perplexity
        tmp = out / f".{packed.MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, out / packed.MANIFEST)
        lines.append(f"reloaded perplexity {result.perplexity:.4f} (trial: {trial.perplexity})")
    return lines
