"""Size accounting: the bytes a real packed format would need for every weight of the model.

Each compressed weight carries a `TensorFormat` in its module's `_cm_formats` ledger (a plain attribute, so the
snapshot restores it with the module). Untouched weights count at the baseline precision (FP32 by default).
  - values: numel x bits; unstructured sparsity stores non-zeros plus a 1-bit-per-weight bitmap (or stays dense
    when that is smaller); N:M stores N of every M values plus ceil(log2 M) index bits per kept value;
    structured pruning shrinks the tensors themselves, so the removed rows/columns simply are not there.
  - quantization adds one scale per group (per output row when group_size is None), `scale_bits` each, and a
    zero point of `bits` bits per group when asymmetric.
compression ratio = 1 - model_bytes / (bytes of the dense model's weights at the baseline precision);
tied weights count once. bits per weight = 8 * model_bytes / number of weights of the dense model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from compactmind.models import block_linears


@dataclass(frozen=True)
class TensorFormat:
    bits: float | None = None  # None: the baseline precision
    scaled: bool = False  # integer codes with scales (quantized) rather than a float format
    group_size: int | None = None  # scales per group of input columns; None: one per output row
    scale_bits: int = 16
    zero_point: bool = False
    sparsity: str = "dense"  # "dense", "unstructured" or "n:m"
    n: int = 0
    m: int = 0


def get_format(module: nn.Module, param: str) -> TensorFormat:
    return module.__dict__.get("_cm_formats", {}).get(param) or TensorFormat()


def set_format(module: nn.Module, param: str, **changes) -> None:
    """Record how `module.<param>` would be stored, composing with what earlier steps recorded."""
    ledger = dict(module.__dict__.get("_cm_formats", {}))
    ledger[param] = dataclasses.replace(get_format(module, param), **changes)
    module.__dict__["_cm_formats"] = ledger


def narrow_to(module: nn.Module, param: str, bits: float) -> None:
    """Record a float cast to `bits` (never widening what an earlier step already narrowed)."""
    current = get_format(module, param).bits
    set_format(module, param, bits=bits if current is None else min(current, bits))


def tensor_bits(weight: torch.Tensor, fmt: TensorFormat, baseline_bits: float) -> float:
    bits = baseline_bits if fmt.bits is None else fmt.bits
    numel = weight.numel()
    rows = weight.shape[0] if weight.dim() >= 2 else 1
    cols = numel // max(rows, 1)
    if fmt.sparsity == "n:m":
        kept = numel * fmt.n / fmt.m
        value_bits = kept * (bits + math.ceil(math.log2(fmt.m)))
    elif fmt.sparsity == "unstructured":
        nnz = int(torch.count_nonzero(weight))
        value_bits = min(numel * bits, nnz * bits + numel)
    else:
        value_bits = numel * bits
    scale_bits = 0.0
    if fmt.scaled:
        groups = rows if fmt.group_size is None else rows * math.ceil(cols / fmt.group_size)
        scale_bits = groups * (fmt.scale_bits + (bits if fmt.zero_point else 0))
    return value_bits + scale_bits


@dataclass(frozen=True)
class Reference:
    """Counts of the dense model, taken once per study before any method runs."""

    n_weights: int
    n_block_linear_weights: int
    baseline_bits: float

    @property
    def dense_bytes(self) -> float:
        return self.n_weights * self.baseline_bits / 8

    @classmethod
    def of(cls, model: nn.Module, baseline_bits: float = 32.0) -> "Reference":
        n = sum(p.numel() for p in model.parameters())
        nb = sum(m.weight.numel() for _, m in block_linears(model))
        return cls(n, nb, baseline_bits)


@dataclass(frozen=True)
class Footprint:
    model_bytes: float
    compression_ratio: float
    bits_per_weight: float
    sparsity: float  # zero or removed weights among the block linears of the dense model


def measure(model: nn.Module, ref: Reference) -> Footprint:
    total_bits = 0.0
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:  # a tied weight (embedding = lm_head) counts once
                seen.add(id(p))
                total_bits += tensor_bits(p, get_format(module, name), ref.baseline_bits)
    nnz = sum(int(torch.count_nonzero(m.weight)) for _, m in block_linears(model))
    model_bytes = total_bits / 8
    return Footprint(
        model_bytes=model_bytes,
        compression_ratio=1.0 - model_bytes / ref.dense_bytes,
        bits_per_weight=total_bits / ref.n_weights,
        sparsity=1.0 - nnz / ref.n_block_linear_weights,
    )
