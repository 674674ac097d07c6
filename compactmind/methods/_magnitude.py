"""Magnitude pruning: zero the weights of smallest absolute value (Han et al., "Learning both Weights and
Connections for Efficient Neural Networks", NeurIPS 2015; the baseline of the SparseGPT and Wanda papers).

Unstructured: in every linear of the transformer blocks, the round(sparsity * numel) weights with the smallest
|W| are set to zero (one threshold per layer, as in the Wanda paper's magnitude baseline). N:M: in every group
of M consecutive input weights of a row, the M - N smallest are zeroed (2:4 is what NVIDIA sparse tensor cores
run). No data is used.

Parameters: `sparsity` (fraction of weights zeroed per layer); `pattern` for the N:M variant ("2:4", "4:8").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactmind.methods._prune_common import NM_PATTERNS, check_nm, check_sparsity, write_pruned_
from compactmind.methods._sparse import lowest_mask, nm_mask, parse_nm
from compactmind.models import block_linears
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Categorical, Float


@register_method("magnitude")
class Magnitude(Method):
    kind = Kind.PRUNING

    @dataclass(frozen=True)
    class Params:
        sparsity: float = 0.5

        def __post_init__(self):
            check_sparsity(self.sparsity)

    space = {"sparsity": Float(0.1, 0.5, step=0.1)}
    identity = Params(sparsity=0.0)

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        if params.sparsity == 0:
            return
        for _, lin in block_linears(model):
            w = lin.weight
            write_pruned_(lin, w.masked_fill(lowest_mask(w.abs().float(), params.sparsity), 0), None)


@register_method("magnitude_nm")
class MagnitudeNM(Method):
    kind = Kind.PRUNING

    @dataclass(frozen=True)
    class Params:
        pattern: str = "2:4"

    space = {"pattern": Categorical(NM_PATTERNS)}

    def check(self, model, params):
        check_nm(model, params.pattern)

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        n, m = parse_nm(params.pattern)
        for _, lin in block_linears(model):
            w = lin.weight
            write_pruned_(lin, w.masked_fill(nm_mask(w.abs().float(), n, m), 0), params.pattern)
