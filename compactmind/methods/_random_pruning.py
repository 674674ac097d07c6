"""Random unstructured pruning: the baseline every pruning method must beat.

Each weight of every linear layer inside the transformer blocks is zeroed with a fixed probability, drawn
from a seeded generator, exactly `round(sparsity * numel)` weights per layer. No data is used.

Parameters: `sparsity`, the fraction of weights set to zero in each layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactmind.footprint import set_format
from compactmind.methods._prune_common import check_sparsity
from compactmind.models import block_linears
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Float


def random_mask(shape: torch.Size, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """A boolean keep-mask with exactly round(sparsity * numel) False entries at random places."""
    numel = int(torch.Size(shape).numel())
    n_zero = round(sparsity * numel)
    keep = torch.ones(numel, dtype=torch.bool)
    if n_zero:
        keep[torch.randperm(numel, generator=generator)[:n_zero]] = False
    return keep.view(shape)


@register_method("random_pruning")
class RandomPruning(Method):
    kind = Kind.PRUNING

    @dataclass(frozen=True)
    class Params:
        sparsity: float = 0.0

        def __post_init__(self):
            check_sparsity(self.sparsity)

    space = {"sparsity": Float(0.1, 0.5, step=0.1)}
    identity = Params(sparsity=0.0)

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        generator = torch.Generator().manual_seed(seed)
        for _, linear in block_linears(model):
            mask = random_mask(linear.weight.shape, params.sparsity, generator)
            linear.weight.mul_(mask.to(linear.weight.device))
            if params.sparsity > 0:
                set_format(linear, "weight", sparsity="unstructured")
