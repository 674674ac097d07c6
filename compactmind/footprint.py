"""Size accounting: the bytes the packed format stores for every weight of the model (formats.layout).

Untouched weights count at the baseline precision (FP32 by default). compression ratio = 1 - model_bytes /
(bytes of the dense model's weights at the baseline precision); tied weights count once. bits per weight =
8 * model_bytes / number of weights of the dense model. sparsity = the fraction of the dense model's block-linear
weights that pruning removed: zeroed by a pruning mask, or cut out by structured pruning (zeros that
quantization rounding happens to produce do not count).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compactmind.formats import entry, stored_bytes
from compactmind.models import block_linears


@dataclass(frozen=True)
class Reference:
    """Counts of the dense model, taken once per study before any method runs."""

    n_weights: int
    n_block_linear_weights: int
    baseline_bits: int

    @property
    def dense_bytes(self) -> int:
        return self.n_weights * self.baseline_bits // 8

    @classmethod
    def of(cls, model: nn.Module, baseline_bits: int = 32) -> "Reference":
        n = sum(p.numel() for p in model.parameters())
        nb = sum(m.weight.numel() for _, m in block_linears(model))
        return cls(n, nb, baseline_bits)


@dataclass(frozen=True)
class Footprint:
    model_bytes: int
    compression_ratio: float
    bits_per_weight: float
    sparsity: float


def parameters(model: nn.Module):
    """(qualified name, module, parameter name, tensor) of every parameter, a tied one once."""
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), module, pname, p


def measure(model: nn.Module, ref: Reference) -> Footprint:
    total = sum(stored_bytes(p, entry(module, pname), ref.baseline_bits) for _, module, pname, p in parameters(model))
    linears = [m for _, m in block_linears(model)]
    removed = ref.n_block_linear_weights - sum(m.weight.numel() for m in linears)  # structured pruning
    pruned = sum(entry(m).pruned for m in linears)
    return Footprint(
        model_bytes=total,
        compression_ratio=1.0 - total / ref.dense_bytes,
        bits_per_weight=8 * total / ref.n_weights,
        sparsity=(removed + pruned) / ref.n_block_linear_weights,
    )
