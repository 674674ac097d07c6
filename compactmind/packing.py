"""The packed format's tensors of each weight (packed.py describes the format; formats.layout says how many bytes
each part takes): integer codes and zero points bit-packed, FP16 scales, kept-position bitmaps for sparse weights,
floats in the narrowest type that holds them exactly. Every packed tensor is checked against its layout and
against the weight that was evaluated. The packed writer (deploy/packed_folder.py) and the level database
(dynamic.py) use it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compactmind import packed
from compactmind.errors import ConfigError
from compactmind.footprint import parameters
from compactmind.formats import FLOAT_NAMES, entry, exact_float_dtype, layout


def on_grid(values: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether grid values are the evaluated weight w (float32, from a tensor of `dtype`): equal once rounded to
    the dtype the model holds them in (a BF16 or FP16 model evaluates its grid values rounded so)."""
    return torch.equal(values.to(dtype).float(), w)


def pack_tensor(name: str, module: nn.Module, param: str, baseline_bits: int) -> tuple[dict, dict]:
    """(manifest entry, stored tensors) for one parameter, as its layout says."""
    held = getattr(module, param).dtype
    w = getattr(module, param).detach().float().cpu()
    e = entry(module, param)
    fmt, plan = e.format, layout(w, e, baseline_bits)
    mask = (w != 0).reshape(-1) if plan.sparse else None
    spec = {"shape": list(w.shape), "bits": None, "group_size": 0, "zero_point": False, "sparse": plan.sparse,
            "act_quant": f"per_token_{e.act_quant}" if e.act_quant else None}
    out = {} if mask is None else {f"{name}.mask": packed.pack_bits(mask.to(torch.uint8), 1)}
    if "ggml" in plan.parts:
        out[f"{name}.ggml"] = _ggml_bytes(name, w, e, held)
        spec.update(ggml=fmt.ggml, act_quant=e.act_quant, dtype=FLOAT_NAMES[getattr(module, param).dtype])
    elif "codes" in plan.parts and fmt.float8:
        out.update(_fp8_parts(name, w, e, mask, held))
        spec.update(bits=8, float8=fmt.float8, scale_shape=list(e.qparams.scale.shape),
                    dtype=FLOAT_NAMES[getattr(module, param).dtype])
    elif "codes" in plan.parts:
        bits, q = fmt.bits, e.qparams
        rows, cols = w.shape
        column_group = torch.arange(cols) // (fmt.group_size or cols) if q.column_group is None \
            else q.column_group.cpu().long()
        scale, zero = q.scale.float().cpu(), q.zero.float().cpu()
        s, z = scale[:, column_group], zero[:, column_group]
        codes = torch.clamp(torch.round(w / s) + z, 0, 2 ** bits - 1)
        if not on_grid(s * (codes - z), w, held):
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
                    dtype=FLOAT_NAMES[getattr(module, param).dtype])  # the dtype the evaluated model held it in
    else:
        dtype = exact_float_dtype(w, fmt.bits or baseline_bits)
        if dtype is None:
            raise ConfigError(f"{name} is recorded at {fmt.bits or baseline_bits} bits but its values are not exactly "
                              "representable there; it cannot be exported as evaluated.")
        spec["dtype"] = FLOAT_NAMES[dtype]
        values = w.to(dtype)
        out[f"{name}.values" if mask is not None else name] = (values.reshape(-1)[mask] if mask is not None
                                                               else values).contiguous()
    stored = {k: t.numel() * t.element_size() for k, t in out.items()}
    expected = {(f"{name}.{part}" if part != "values" or mask is not None else name): n
                for part, n in plan.parts.items()}
    if stored != expected:
        raise RuntimeError(f"{name}: stored {stored} bytes, the accounting counts {expected}")
    return spec, out


def _ggml_bytes(name: str, w: torch.Tensor, e, held: torch.dtype) -> torch.Tensor:
    """A ggml-typed weight's blocks, checked to decode to exactly the evaluated weight."""
    from compactmind import ggml

    codes, values = ggml.quantize_columns(e.grid, w, 0)
    if not on_grid(values, w, held):
        raise RuntimeError(f"{name}: the weight is not on its recorded {e.format.ggml} grid (a later step changed "
                           "it); it cannot be stored.")
    return torch.from_numpy(ggml.encode(e.grid, codes)).reshape(-1)


def _fp8_parts(name: str, w: torch.Tensor, e, mask: torch.Tensor | None, held: torch.dtype) -> dict[str, torch.Tensor]:
    """An FP8 weight's values (a byte each; the kept ones when sparse) and its FP32 scales, checked to give back
    exactly the weight."""
    scale = e.qparams.scale.float().cpu()
    values = (w / scale).to(torch.float8_e4m3fn)
    if not on_grid(values.float() * scale, w, held):
        raise RuntimeError(f"{name}: the weight is not on its recorded FP8 grid (a later step changed it); it cannot "
                           "be stored.")
    codes = values.view(torch.uint8).reshape(-1)
    return {f"{name}.codes": (codes if mask is None else codes[mask]).contiguous(), f"{name}.scale": scale.contiguous()}


def packed_state(model: nn.Module, baseline_bits: int) -> tuple[dict, dict]:
    """Manifest entries and stored tensors of every parameter (a tied weight once)."""
    specs, tensors = {}, {}
    for name, module, pname, _ in parameters(model):
        specs[name], out = pack_tensor(name, module, pname, baseline_bits)
        tensors.update(out)
    return specs, tensors


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def folder_bytes(folder: Path, names=(packed.WEIGHTS,)) -> int:
    return sum((Path(folder) / n).stat().st_size for n in names)


