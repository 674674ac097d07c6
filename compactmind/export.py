"""Export: re-apply a trial's pipeline to the original model and write it in the packed format (packed.py).

Each weight is written exactly as its ledger entry's layout says (formats.layout), so the stored tensors take
exactly the bytes the trial's recorded size counts: integer codes and zero points bit-packed, FP16 scales,
kept-position bitmaps for sparse weights, FP16/BF16 for float casts, the model's dtype for untouched tensors.
Every packed tensor is checked to unpack to exactly the weight that was evaluated.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from compactmind import packed
from compactmind.config import RunConfig
from compactmind.errors import ConfigError
from compactmind.files import atomic_write
from compactmind.formats import entry, layout
from compactmind.footprint import parameters

log = logging.getLogger(__name__)

VERIFY_TOLERANCE = 1e-4  # relative: the same weights on the same windows give the same perplexity to ~1e-6
W8A8_TOLERANCE = 2e-2  # compressed-tensors W8A8 in transformers: activations are not quantized there
DENSE_TOLERANCE = 1e-2  # a dense FP16 checkpoint rounds k-bit weights to FP16
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
    """Write the packed folder atomically (a temporary sibling, then rename); returns the manifest written."""
    from compactmind import deploy

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(out_dir)
    specs, tensors = packed_state(model, baseline_bits)
    dtype = _FLOAT_NAMES[next(model.parameters()).dtype]
    manifest = {**manifest, "stored_tensor_bytes": stored_bytes(tensors),
                "format": {"version": packed.FORMAT_VERSION, "dtype": dtype, "tensors": specs}}
    loader = {"AutoModelForCausalLM": "modeling_compactmind.CompactModelForCausalLM"}
    config = deploy.hf_config(model, {"auto_map": loader}, dtype)

    def fill(folder: Path) -> None:
        deploy.save(model, tokenizer, folder, tensors, config, manifest,
                    {"format": "compactmind-packed", "version": str(packed.FORMAT_VERSION)})
        shutil.copyfile(Path(packed.__file__), folder / "modeling_compactmind.py")

    deploy.write_folder(out_dir, fill)
    return manifest


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


def _methods_of(trial, records) -> list[list[str]]:
    """The method names of each pipeline the trial applies (every level a dynamic profile uses)."""
    from compactmind import pipeline as pl

    if trial.get("profile") is not None:
        levels = (records.dynamic or {}).get("levels", [])
        labels = [levels[i] for i in sorted(set(trial.get("profile")))]
    else:
        labels = [trial.pipeline]
    return [[s.method for s in pl.parse(label).steps] for label in labels]


def export_trial(local: RunConfig, which: str, out: Path, verify: bool, fmt: str = "packed") -> list[str]:
    """Re-apply a trial's pipeline to the study's model (same calibration data and seed), write the folder in
    `fmt` (packed, compressed-tensors, dense), and optionally reload it and re-measure its perplexity. Returns
    the lines to print."""
    from compactmind import deploy
    from compactmind.study.session import joined_config, open_records

    study, records = open_records(local.storage, local.study_name)
    trial = pick_trial(records, which)
    refused = deploy.refusal(_methods_of(trial, records), fmt)
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
    writers = {"packed": lambda: write(loaded.model, loaded.tokenizer, out, manifest, cfg.baseline_bits),
               "compressed-tensors": lambda: deploy.write_compressed_tensors(loaded.model, loaded.tokenizer, out,
                                                                             manifest),
               "dense": lambda: deploy.write_dense(loaded.model, loaded.tokenizer, out, manifest)}
    try:
        manifest = writers[fmt]()
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
        lines.append(_verify(out, fmt, manifest, trial, data.windows, cfg.batch_size, device, lines))
    return lines


def _rebuild(cfg: RunConfig, study, trial):
    """The study's model and data (refused when their content changed), compressed as the trial was."""
    from compactmind import pipeline as pl
    from compactmind.study.session import candidates_of, check_identity, study_identity
    from compactmind.trial import Executor, load

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


def _tolerance(fmt: str, manifest: dict) -> float:
    """How far a reloaded perplexity may stray: packed and k-bit compressed-tensors store the evaluated weights
    exactly; transformers does not quantize a W8A8 model's activations; FP16 rounds k-bit weights."""
    if fmt == "dense":
        return DENSE_TOLERANCE
    if fmt == "compressed-tensors" and manifest["format"].get("format") != "pack-quantized":
        return W8A8_TOLERANCE
    return VERIFY_TOLERANCE


def _verify(out: Path, fmt: str, manifest: dict, trial, windows, batch_size: int, device, lines: list) -> str:
    from compactmind.evaluate import perplexity

    result = perplexity(reload(out, fmt, device), windows, batch_size)
    manifest["verified_perplexity"] = result.perplexity
    atomic_write(out / packed.MANIFEST, json.dumps(manifest, indent=2, default=str))
    line = f"reloaded perplexity {result.perplexity:.4f} (trial: {trial.perplexity})"
    tolerance = _tolerance(fmt, manifest)
    if trial.perplexity is not None and abs(result.perplexity / trial.perplexity - 1) > tolerance:
        raise ExportMismatch(f"The exported model's perplexity {result.perplexity:.6g} differs from trial "
                             f"{trial.number}'s {trial.perplexity:.6g} by more than {tolerance:.0e} (relative): the "
                             "model, data or method is not what the study measured.", lines + [line])
    return line


def reload(folder: Path, fmt: str, device) -> nn.Module:
    """The written folder loaded back as a user loads it: packed through its own loader, the others through
    transformers alone."""
    if fmt == "packed":
        return packed.load(folder, device=device)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


class ExportMismatch(ConfigError):
    """--verify measured another perplexity than the trial's (the folder is written; the lines say what)."""

    def __init__(self, message: str, lines: list[str]):
        super().__init__(message)
        self.lines = lines
