"""Magnitude pruning: zero the weights of smallest absolute value (Han et al., "Learning both Weights and
Connections for Efficient Neural Networks", NeurIPS 2015; the baseline of the SparseGPT and Wanda papers).

Unstructured: in every linear of the transformer blocks, the round(sparsity * numel) weights with the smallest
|W| are set to zero (one threshold per layer, as in the Wanda paper's magnitude baseline). N:M: in every group
of M consecutive input weights of a row, the M - N smallest are zeroed (2:4 is what NVIDIA sparse tensor cores
run). No data is used.

Parameters: `sparsity` (fraction of weights zeroed per layer); `pattern` for the N:M variant ("2:4", "4:8").
"""

from __future__ import annotations

import torch

from compactmind.methods._prune_common import NMPruning, UnstructuredPruning, write_pruned_
from compactmind.methods._sparse import lowest_mask, nm_mask, parse_nm
from compactmind.models import block_linears
from compactmind.registry import register_method


@register_method("magnitude")
class Magnitude(UnstructuredPruning):
    summary = "zeroes the weights of smallest |W| in every block linear (Han et al. 2015)"

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        if params.sparsity == 0:
            return
        for _, lin in block_linears(model):
            mask = lowest_mask(lin.weight.abs().float(), params.sparsity)
            write_pruned_(lin, lin.weight.masked_fill(mask, 0), mask, None)


@register_method("magnitude_nm")
class MagnitudeNM(NMPruning):
    summary = "keeps the N largest |W| of every M consecutive inputs (2:4, 4:8)"

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        n, m = parse_nm(params.pattern)
        for _, lin in block_linears(model):
            mask = nm_mask(lin.weight.abs().float(), n, m)
            write_pruned_(lin, lin.weight.masked_fill(mask, 0), mask, params.pattern)
