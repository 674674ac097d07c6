"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023).

Pruning as layer-wise reconstruction: with the layer Hessian H = 2 X X^T of the calibration inputs, columns are
processed left to right in blocks of 128. In each block the mask is chosen adaptively (lowest w^2 / [H^-1]_jj^2,
the OBS saliency), and every pruned or kept column's error is spread over the remaining columns through the
Cholesky factor of H^-1, so the surviving weights compensate for the removed ones. Dampening adds 1% of the
mean diagonal to H. N:M picks the mask per group of M columns as it reaches them. Statistics come from the
shared layer-by-layer calibration loop. On a weight an earlier step quantized, the mask is chosen the same way
but the kept weights are not updated: updates would move them off the quantization grid, so the model would no
longer be the packed k-bit model the accounting (and an export) describes.

Parameters: `sparsity` (fraction zeroed per layer); `pattern` for the N:M variant ("2:4", "4:8").
"""

from __future__ import annotations

import torch

from compactmind.calibration import Hessian, require, sequential_
from compactmind.formats import get_format
from compactmind.methods._prune_common import NMPruning, UnstructuredPruning, write_pruned_
from compactmind.methods._sparse import parse_nm, sparsegpt_
from compactmind.registry import register_method

DAMP = 0.01


def _prune(model, calib, name, sparsity, pattern):
    calib = require(calib, name)
    nm = parse_nm(pattern) if pattern else None

    def solve(_i, layer, stats, _samples):
        modules = dict(layer.named_modules())
        for lname, acc in stats.items():
            lin = modules[lname]
            quantized = get_format(lin, "weight").scaled
            pruned, mask = sparsegpt_(lin.weight, acc.H, sparsity, nm, damp=DAMP, update=not quantized)
            write_pruned_(lin, pruned, mask, pattern)

    sequential_(model, calib, lambda _n, lin: Hessian(lin), solve)


@register_method("sparsegpt")
class SparseGPT(UnstructuredPruning):
    summary = "prunes with OBS updates of the kept weights (Frantar & Alistarh 2023)"
    needs_calibration = True

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        _prune(model, calib, self.name, params.sparsity, None)


@register_method("sparsegpt_nm")
class SparseGPTNM(NMPruning):
    summary = "SparseGPT with an N:M pattern (2:4, 4:8)"
    needs_calibration = True

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        _prune(model, calib, self.name, 0.0, params.pattern)
