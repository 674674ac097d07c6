"""Export: re-apply a trial's pipeline to the original model and write it in the packed format (packed.py).

Each weight is written as its format ledger says it would be stored (footprint.py), so the folder on disk is
smaller by about the recorded compression ratio: integer codes bit-packed with FP16 scales and zero points,
kept-position bitmaps for sparse weights, FP16/BF16 for float casts, the baseline dtype for untouched tensors.
Every packed tensor is checked to unpack to exactly the weight that was evaluated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from compactmind import packed
from compactmind.footprint import get_format

_FLOAT_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _float_dtype(w: torch.Tensor, bits: float | None, baseline: torch.dtype) -> torch.dtype:
    """The narrowest float dtype the recorded format allows that holds these values exactly."""
    if bits is not None and bits <= 16:
        for dtype in (torch.float16, torch.bfloat16):
            if torch.equal(w.to(dtype).float(), w):
                return dtype
    return baseline


def pack_tensor(name: str, module: nn.Module, param: str, baseline: torch.dtype) -> tuple[dict, dict]:
    """(manifest entry, stored tensors) for one parameter."""
    w = getattr(module, param).detach().float().cpu()
    fmt = get_format(module, param)
    qparams = module.__dict__.get("_cm_qparams", {}).get(param)
    mask = None
    if fmt.sparsity != "dense" and w.dim() == 2:
        keep = w != 0
        bits = fmt.bits if fmt.bits is not None else torch.finfo(baseline).bits
        if fmt.sparsity == "n:m" or int(keep.sum()) * bits + w.numel() < w.numel() * bits:
            mask = keep.reshape(-1)
    spec = {"shape": list(w.shape), "bits": None, "group_size": 0, "zero_point": False, "sparse": mask is not None,
            "act_quant": "per_token_int8" if _has_act_quant(module) else None}
    out = {}
    if mask is not None:
        out[f"{name}.mask"] = packed.pack_bits(mask.to(torch.uint8), 1)
    if fmt.scaled and qparams is not None:
        bits = int(fmt.bits)
        rows, cols = w.shape
        scale = qparams["scale"].float().cpu()
        zero = qparams["zero"].float().cpu()
        groups = qparams["column_group"]
        group_size = fmt.group_size or cols
        column_group = torch.arange(cols) // group_size if groups is None else groups.cpu().long()
        s, z = scale[:, column_group], zero[:, column_group]
        codes = torch.clamp(torch.round(w / s) + z, 0, 2 ** bits - 1)
        if not torch.allclose(s * (codes - z), w, rtol=0, atol=1e-6 * float(scale.abs().max()) + 1e-12):
            raise RuntimeError(f"{name}: the weight is not on its recorded {bits}-bit grid (a later step changed it);"
                               " it cannot be packed.")
        flat = codes.reshape(-1).to(torch.uint8)
        out[f"{name}.codes"] = packed.pack_bits(flat if mask is None else flat[mask], bits)
        out[f"{name}.scale"] = qparams["scale"].cpu().half().contiguous()
        if fmt.zero_point:
            out[f"{name}.zero"] = qparams["zero"].cpu().to(torch.uint8).contiguous()
        if groups is not None:
            out[f"{name}.group_index"] = column_group.to(torch.int32)
        spec.update(bits=bits, group_size=fmt.group_size or 0, zero_point=fmt.zero_point,
                    dtype=_FLOAT_NAMES[baseline])  # the dtype the evaluated model held the weight in
    else:
        dtype = _float_dtype(w, fmt.bits, baseline)
        spec["dtype"] = _FLOAT_NAMES[dtype]
        values = w.to(dtype)
        if mask is not None:
            out[f"{name}.values"] = values.reshape(-1)[mask].contiguous()
        else:
            out[name] = values.contiguous()
    return spec, out


def _has_act_quant(module: nn.Module) -> bool:
    return any(getattr(h, "__name__", "") == "_per_token_int8" for h in module._forward_pre_hooks.values())


def packed_state(model: nn.Module) -> tuple[dict, dict]:
    """Manifest entries and stored tensors of every parameter (a tied weight once)."""
    baseline = next(model.parameters()).dtype
    specs, tensors, seen = {}, {}, set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            spec, out = pack_tensor(name, module, pname, baseline)
            specs[name] = spec
            tensors.update(out)
    return specs, tensors


def write(model: nn.Module, tokenizer, out_dir: Path, manifest: dict) -> dict:
    """Write the folder atomically (a temporary sibling, then rename); returns the manifest written."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        specs, tensors = packed_state(model)
        save_file(tensors, str(tmp / packed.WEIGHTS), metadata={"format": "compactmind-packed",
                                                                 "version": str(packed.FORMAT_VERSION)})
        config = model.config.to_dict()
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_compactmind.CompactModelForCausalLM"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.copyfile(Path(packed.__file__), tmp / "modeling_compactmind.py")
        stored = sum(t.numel() * t.element_size() for t in tensors.values())
        dtype = next(model.parameters()).dtype
        manifest = {**manifest, "stored_tensor_bytes": stored,
                    "format": {"version": packed.FORMAT_VERSION, "dtype": _FLOAT_NAMES[dtype], "tensors": specs}}
        (tmp / packed.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def folder_bytes(folder: Path, names=(packed.WEIGHTS,)) -> int:
    return sum((Path(folder) / n).stat().st_size for n in names)

