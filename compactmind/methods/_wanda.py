"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach
for Large Language Models", ICLR 2024; arXiv 2023).

A weight's importance is |W_ij| * ||X_j||_2, its magnitude times the L2 norm of its input channel over the
calibration tokens, so a small weight on an outlier channel survives. Weights are compared within each output
row (unstructured: the lowest `sparsity` fraction of each row is zeroed) or within each group of M inputs
(N:M). No weight update. Statistics come from the shared layer-by-layer calibration loop, so each block is
scored on inputs that already went through the pruned blocks before it.

Parameters: `sparsity` (fraction zeroed per output row); `pattern` for the N:M variant ("2:4", "4:8").
"""

from __future__ import annotations

import torch

from compactmind.calibration import InputNorms, require, sequential_
from compactmind.methods._prune_common import NMPruning, UnstructuredPruning, write_pruned_
from compactmind.methods._sparse import lowest_per_row_mask, nm_mask, parse_nm
from compactmind.registry import register_method


def wanda_score(weight: torch.Tensor, input_sq_mean: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j|| (the per-token mean of x_j^2 gives the same ranking as the sum)."""
    return weight.abs().float() * input_sq_mean.sqrt().unsqueeze(0)


def _prune(model, calib, name, mask_of, pattern):
    calib = require(calib, name)

    def solve(_i, layer, stats, _samples):
        modules = dict(layer.named_modules())
        for lname, acc in stats.items():
            lin = modules[lname]
            mask = mask_of(wanda_score(lin.weight, acc.sq))
            write_pruned_(lin, lin.weight.masked_fill(mask, 0), mask, pattern)

    sequential_(model, calib, lambda _n, lin: InputNorms(lin), solve)


@register_method("wanda")
class Wanda(UnstructuredPruning):
    summary = "prunes the lowest |W|·||X_j|| of every output row (Sun et al. 2023)"
    needs_calibration = True

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        _prune(model, calib, self.name, lambda s: lowest_per_row_mask(s, params.sparsity), None)


@register_method("wanda_nm")
class WandaNM(NMPruning):
    summary = "Wanda's score, N kept in every M consecutive inputs (2:4, 4:8)"
    needs_calibration = True

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        n, m = parse_nm(params.pattern)
        _prune(model, calib, self.name, lambda s: nm_mask(s, n, m), params.pattern)
