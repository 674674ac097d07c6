"""Random unstructured pruning: the baseline every pruning method must beat.

In every linear layer inside the transformer blocks, exactly `round(sparsity * numel)` weights chosen uniformly
at random (a seeded permutation) are set to zero. No data is used.

Parameters: `sparsity`, the fraction of weights set to zero in each layer.
"""

from __future__ import annotations

import torch

from compactmind.methods._prune_common import UnstructuredPruning, write_pruned_
from compactmind.models import block_linears
from compactmind.registry import register_method


def random_mask(shape: torch.Size, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """A boolean keep-mask with exactly round(sparsity * numel) False entries at random places."""
    numel = int(torch.Size(shape).numel())
    n_zero = round(sparsity * numel)
    keep = torch.ones(numel, dtype=torch.bool)
    if n_zero:
        keep[torch.randperm(numel, generator=generator)[:n_zero]] = False
    return keep.view(shape)


@register_method("random_pruning")
class RandomPruning(UnstructuredPruning):
    summary = "zeroes a random fraction of every block linear's weights (the baseline)"
    random = True

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        generator = torch.Generator().manual_seed(seed)
        for _, linear in block_linears(model):
            if params.sparsity > 0:
                keep = random_mask(linear.weight.shape, params.sparsity, generator).to(linear.weight.device)
                write_pruned_(linear, linear.weight * keep, ~keep, None)
