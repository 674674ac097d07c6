"""How each weight would be stored: its format, recorded by the methods in one ledger per module, and the
bytes of every tensor the packed format writes for it (`layout`), used by both the size accounting
(footprint.py) and the packed writer (packing.py), so the two cannot disagree.

A module's ledger is the plain attribute `_cm_ledger`: {parameter name: Entry}. The snapshot restores it with
the module. An Entry holds the TensorFormat, the quantization parameters when the weight holds integer codes
(scales and zero points per group, and the column -> group map after structured pruning), the number of
weights a pruning step zeroed, and whether the module quantizes its inputs (per token for W8A8, in ggml's blocks
for a GGUF type evaluated as llama.cpp computes it).

The stored tensors (bytes, exactly as packing.py writes them):
  values       float values (numel x bits / 8), or only the kept ones when sparse
  codes        k-bit integer codes, bit-packed: ceil(count x k / 8); FP8 values, a byte each
  mask         1 bit per weight, bit-packed, when the sparse layout is smaller than the dense one
  scale        FP16 (FP32 for FP8), one per output row and group (or one for the tensor): rows x groups x 2 (4)
  zero         k-bit zero points, bit-packed, when asymmetric: ceil(rows x groups x k / 8)
  group_index  int32 per input column, when structured pruning removed columns after quantization
  ggml         a llama.cpp block type's bytes (ggml.py): ggml.bytes_of(type, numel), scales and codes together
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

import torch
from torch import nn

LEDGER = "_cm_ledger"
FLOAT_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_FLOATS_BY_BITS = {16: (torch.float16, torch.bfloat16), 32: (torch.float32,),
                   None: (torch.float16, torch.bfloat16, torch.float32)}
GROUP_INDEX_BYTES = 4  # int32


class Sparsity(str, enum.Enum):
    DENSE = "dense"
    UNSTRUCTURED = "unstructured"
    NM = "n:m"


@dataclass(frozen=True)
class TensorFormat:
    bits: int | None = None  # None: the baseline precision; 16 for a float cast; k for integer codes
    scaled: bool = False  # integer codes with scales (quantized) rather than a float format
    group_size: int | None = None  # scales per group of input columns; None: one per output row
    zero_point: bool = False
    sparsity: Sparsity = Sparsity.DENSE
    n: int = 0  # N:M pattern, when sparsity is NM
    m: int = 0
    cast: str | None = None  # the 16-bit float type a cast stored the values in: "float16" or "bfloat16"
    ggml: str | None = None  # a llama.cpp block type ("Q4_K", ...; ggml.TYPES): its blocks hold the weight
    float8: str | None = None  # "e4m3": the codes are FP8 values (times the scale), not integers
    scale_bits: int = 16  # the scales' storage: FP16, or FP32 (FP8's, as vLLM loads them)


@dataclass(frozen=True)
class QuantParams:
    scale: torch.Tensor  # float16 [rows, groups]
    zero: torch.Tensor  # uint8 [rows, groups] (2^(k-1) everywhere when symmetric)
    column_group: torch.Tensor | None = None  # int64 [cols]: group of each column, when not column // group_size


@dataclass(frozen=True)
class Entry:
    format: TensorFormat = TensorFormat()
    qparams: QuantParams | None = None
    pruned: int = 0  # weights a pruning step set to zero (the mask, not zeros that rounding produced)
    act_quant: str | None = None  # "int8" / "fp8": inputs quantized per token (W8A8); "ggml": as llama.cpp's CPU does
    grid: object | None = None  # ggml.Grid of a ggml-typed weight: its blocks' stored scales (codes = nearest)


def entry(module: nn.Module, param: str = "weight") -> Entry:
    return module.__dict__.get(LEDGER, {}).get(param) or Entry()


def get_format(module: nn.Module, param: str = "weight") -> TensorFormat:
    return entry(module, param).format


def record(module: nn.Module, param: str = "weight", *, qparams: QuantParams | None | bool = False,
           pruned: int | None = None, act_quant: str | None | bool = False, grid: object | bool = False,
           **format_changes) -> None:
    """Record how `module.<param>` would be stored, composing with what earlier steps recorded
    (qparams=False and grid=False leave them as they are; None clears them)."""
    ledger = dict(module.__dict__.get(LEDGER, {}))
    old = entry(module, param)
    ledger[param] = Entry(
        format=dataclasses.replace(old.format, **format_changes),
        qparams=old.qparams if qparams is False else qparams,
        pruned=old.pruned if pruned is None else pruned,
        act_quant=old.act_quant if act_quant is False else act_quant,
        grid=old.grid if grid is False else grid)
    module.__dict__[LEDGER] = ledger


def narrow_to(module: nn.Module, param: str, dtype: torch.dtype) -> None:
    """Record a cast to a 16-bit float type (never widening what an earlier step already narrowed)."""
    if get_format(module, param).bits is None:
        record(module, param, bits=torch.finfo(dtype).bits, cast=str(dtype).replace("torch.", ""))


def on_cast_grid(module: nn.Module, param: str, value: torch.Tensor) -> torch.Tensor:
    """`value` rounded to the float type a cast recorded for this weight (a later step that updates the weight,
    SparseGPT's OBS updates, must not leave it between the values the format can store)."""
    cast = get_format(module, param).cast
    return value.to(getattr(torch, cast)).to(value.dtype) if cast else value


def exact_float_dtype(t: torch.Tensor, bits: int | None = None) -> torch.dtype | None:
    """The narrowest float type (of `bits` bits, or any) that holds every value of `t` exactly; None: none does."""
    values = t.detach().float()
    for dtype in _FLOATS_BY_BITS[bits]:
        if torch.equal(values.to(dtype).float(), values):
            return dtype
    return None


def is_sparse(module: nn.Module, param: str = "weight") -> bool:
    return get_format(module, param).sparsity is not Sparsity.DENSE


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


@dataclass(frozen=True)
class Layout:
    """The stored tensors of one weight: name suffix -> bytes; `sparse`: only the kept values are stored."""

    parts: dict[str, int]
    sparse: bool
    kept: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def layout(weight: torch.Tensor, e: Entry, baseline_bits: int) -> Layout:
    fmt = e.format
    numel = weight.numel()
    if fmt.ggml is not None:  # llama.cpp's blocks: scales and codes together, no sparsity
        from compactmind import ggml

        return Layout({"ggml": ggml.bytes_of(fmt.ggml, numel)}, False, numel)
    bits = fmt.bits if fmt.bits is not None else baseline_bits

    def value_bytes(count: int) -> int:
        return packed_bytes(count, bits)

    kept, sparse = numel, False
    if fmt.sparsity is not Sparsity.DENSE and weight.dim() == 2:
        nnz = int(torch.count_nonzero(weight))
        if packed_bytes(numel, 1) + value_bytes(nnz) < value_bytes(numel):
            kept, sparse = nnz, True
    parts = {"mask": packed_bytes(numel, 1)} if sparse else {}
    if fmt.scaled and e.qparams is not None:
        rows, groups = e.qparams.scale.shape
        parts["codes"] = value_bytes(kept)
        parts["scale"] = rows * groups * fmt.scale_bits // 8
        if fmt.zero_point:
            parts["zero"] = packed_bytes(rows * groups, bits)
        if e.qparams.column_group is not None:
            parts["group_index"] = weight.shape[1] * GROUP_INDEX_BYTES
    else:
        parts["values"] = value_bytes(kept)
    return Layout(parts, sparse, kept)


def stored_bytes(weight: torch.Tensor, e: Entry, baseline_bits: int) -> int:
    return layout(weight, e, baseline_bits).total
