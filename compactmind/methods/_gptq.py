"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023).

Weight-only quantization as layer-wise reconstruction: with the layer Hessian H = 2 X X^T of the calibration
inputs, each column is rounded in turn and its rounding error is distributed over the columns not yet
quantized through the Cholesky factor of H^-1 (the OBQ update, applied in lazy blocks of 128 columns).
Dampening adds `damp` times the mean diagonal to H for stability; act_order processes columns by decreasing
H_jj (the most sensitive first); groups are contiguous input columns, so the packed layout is the same as RTN's.
Each weight takes the nearest value its stored (FP16) scale gives, so the error fed back is the checkpoint's.
Weights that an earlier pruning step zeroed stay zero. Statistics come from the shared layer-by-layer
calibration loop. Embeddings, norms and the head are kept in FP16.

Parameters: `bits`, `group_size` (0: per output channel), `symmetric`, `act_order`, `damp` (fraction of the
mean Hessian diagonal added to it; the paper uses 0.01), `static_groups` (default: a group's scale and zero
point from the original weights before the loop; off: from the weights as the error feedback has left them
when the loop first reaches the group, the reference implementation's default). On SmolLM2, W4 g64 symmetric,
calibration seeds 0/1/2: static 45.07/45.55/44.41, dynamic 47.08/47.09/45.67; asymmetric 41.97/42.55/42.10 and
42.17/42.85/41.92 (scripts/quality.py's protocol). `true_sequential` (the block's linears in stages, q/k/v, o,
gate/up, down, each stage's Hessians taken after the earlier stages are quantized): 2-3x the calibration time
and no better here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactmind.calibration import Hessian, require, sequential_
from compactmind.formats import is_sparse
from compactmind.methods._quant import WeightQuantizer, cast_rest_to_fp16_, gptq, write_quantized_
from compactmind.registry import register_method
from compactmind.space import Categorical


@register_method("gptq")
class GPTQ(WeightQuantizer):
    summary = "k-bit, rounding errors spread through the inverse Hessian (Frantar et al. 2022)"
    needs_calibration = True

    @dataclass(frozen=True)
    class Params(WeightQuantizer.Params):
        act_order: bool = True
        damp: float = 0.01
        static_groups: bool = True
        true_sequential: bool = False

        def __post_init__(self):
            super().__post_init__()
            if not 0 < self.damp < 1:
                raise ValueError(f"damp must be in (0, 1), got {self.damp}")

    space = {"bits": Categorical([3, 4]), "group_size": Categorical([128, 0]), "symmetric": Categorical([False]),
             "act_order": Categorical([True, False]), "damp": Categorical([0.01]),
             "static_groups": Categorical([True, False], searched=[True]),
             "true_sequential": Categorical([False, True], searched=[False])}
    version = 3  # 3: each weight the nearest value of the stored FP16 scale, the error fed back the stored one

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        calib = require(calib, self.name)

        def solve(_i, layer, stats, _samples):
            modules = dict(layer.named_modules())
            for lname, acc in stats.items():
                lin = modules[lname]
                q = gptq(lin.weight, acc.H, params.bits, params.group_size, params.symmetric, params.act_order,
                         params.damp, keep_zeros=is_sparse(lin), static_groups=params.static_groups)
                write_quantized_(lin, q, params.bits, params.group_size, params.symmetric)

        sequential_(model, calib, lambda _n, lin: Hessian(lin), solve, true_sequential=params.true_sequential)
        cast_rest_to_fp16_(model)
