"""Glue shared by the pruning methods: their two parameter sets (a sparsity, or an N:M pattern), walking the
block linears and recording the sparse format. The math lives in _sparse.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compactmind.errors import IncompatiblePipelineError
from compactmind.formats import Sparsity, entry, on_cast_grid, record
from compactmind.methods._sparse import parse_nm
from compactmind.models import block_linears
from compactmind.registry import Kind, Method
from compactmind.space import Categorical, Float

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


def write_pruned_(linear: nn.Linear, new_weight: torch.Tensor, mask: torch.Tensor, pattern: str | None) -> None:
    """Store the pruned weight and record its format: sparse (unstructured or n:m) and how many weights the mask
    (True = pruned) removed."""
    linear.weight.copy_(on_cast_grid(linear, "weight", new_weight.to(linear.weight.dtype)))
    pruned = max(entry(linear).pruned, int(mask.sum()))  # an earlier pruning step's zeros are in this mask too
    if pattern is None:
        record(linear, "weight", sparsity=Sparsity.UNSTRUCTURED, pruned=pruned)
    else:
        n, m = parse_nm(pattern)
        record(linear, "weight", sparsity=Sparsity.NM, n=n, m=m, pruned=pruned)


class UnstructuredPruning(Method):
    """Base of the unstructured pruning methods: `sparsity`, the fraction of each layer's weights zeroed."""

    kind = Kind.PRUNING

    @dataclass(frozen=True)
    class Params:
        sparsity: float = 0.5

        def __post_init__(self):
            check_sparsity(self.sparsity)

    space = {"sparsity": Float(0.1, 0.5, step=0.1)}
    identity = Params(sparsity=0.0)


class NMPruning(Method):
    """Base of the N:M pruning methods: `pattern`, N weights kept in every group of M consecutive inputs."""

    kind = Kind.PRUNING

    @dataclass(frozen=True)
    class Params:
        pattern: str = "2:4"

    space = {"pattern": Categorical(NM_PATTERNS)}

    def check(self, model, params):
        check_nm(model, params.pattern)
