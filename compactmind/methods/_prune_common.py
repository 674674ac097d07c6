"""Glue shared by the calibration-based and magnitude pruning methods: walking the block linears and
recording the sparse format. The math lives in _sparse.py."""

from __future__ import annotations

import torch
from torch import nn

from compactmind.errors import IncompatiblePipelineError
from compactmind.footprint import set_format
from compactmind.methods._sparse import parse_nm
from compactmind.models import block_linears

NM_PATTERNS = ["2:4", "4:8"]


def check_nm(model, pattern: str) -> None:
    n, m = parse_nm(pattern)
    for name, lin in block_linears(model):
        if lin.in_features % m:
            raise IncompatiblePipelineError(f"{pattern} sparsity needs input widths divisible by {m}; {name} has "
                                            f"{lin.in_features}.")


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def write_pruned_(linear: nn.Linear, new_weight: torch.Tensor, pattern: str | None) -> None:
    """Store the pruned weight and record its format (unstructured bitmap, or n:m metadata)."""
    linear.weight.copy_(new_weight.to(linear.weight.dtype))
    if pattern is None:
        set_format(linear, "weight", sparsity="unstructured")
    else:
        n, m = parse_nm(pattern)
        set_format(linear, "weight", sparsity="n:m", n=n, m=m)
