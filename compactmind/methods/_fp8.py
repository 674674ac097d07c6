"""FP8 (E4M3) quantization, what H100/H200 serve natively (Micikevicius et al., "FP8 Formats for Deep Learning",
2022; vLLM's W8A8-FP8 and W8A16-FP8 schemes).

Every block linear's weight is stored as E4M3 values (4 exponent bits, 3 mantissa bits, largest 448) times a
scale: one per output channel (max|row| / 448) or one for the whole tensor, kept in FP32 as vLLM loads them. With
`scheme=w8a8` the inputs of each linear are also quantized to E4M3 at every forward, dynamically, one scale per
token (max|x| / 448); `w8a16` keeps them in the evaluation precision. Embeddings, norms and the head are kept in
FP16. `solver=rtn` rounds each weight to its nearest E4M3 value (no data); `solver=gptq` rounds the columns in
turn and spreads each column's rounding error over the columns not yet rounded through the inverse Hessian of
the calibration inputs (GPTQ's loop onto the E4M3 grid, the scales fixed from the original weights; with w8a8 each
block is calibrated on the outputs of the blocks before it with their activations already in FP8). On SmolLM2
(16 test windows of 512, dense 36.077): W8A16 per channel +2.18% by rtn, +0.50% by gptq. `export --format
compressed-tensors` writes it as `float-quantized`, the layout vLLM loads.

Parameters: `scheme` (w8a8 or w8a16), `scales` (channel or tensor), `solver` (rtn or gptq).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactmind.calibration import Hessian, require, sequential_
from compactmind.formats import QuantParams, is_sparse, record
from compactmind.methods._quant import cast_rest_to_fp16_, gptq_solve
from compactmind.models import block_linears
from compactmind.packed import FP8_MAX, per_token_fp8
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Categorical

SCHEMES, SCALES, SOLVERS = ("w8a8", "w8a16"), ("channel", "tensor"), ("rtn", "gptq")


def fp8_scale(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The FP32 scale max|w| / 448, [rows, 1] per output channel or [1, 1] for the tensor (1 where all is 0)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1, keepdim=True) if per_channel else wf.abs().amax().reshape(1, 1)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def to_e4m3(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The nearest E4M3 value of w / scale (saturating at 448), times the scale, in FP32."""
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def fp8_quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values times the scale in FP32, the FP32 scale [rows, 1] or [1, 1]): round to nearest."""
    scale = fp8_scale(w, per_channel)
    return to_e4m3(w, scale), scale


def fp8_gptq(w: torch.Tensor, H: torch.Tensor, per_channel: bool, keep_zeros: bool = False,
             damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ onto the E4M3 grid of the scale of the original weights (act order): (values, scale) as fp8_quantize."""
    scale = fp8_scale(w, per_channel)
    column_scale = scale.squeeze(1) if per_channel else scale.reshape(())
    keep = (w != 0) if keep_zeros else None
    values = gptq_solve(w, H, lambda _j, col, _current: to_e4m3(col, column_scale), act_order=True, damp=damp,
                        keep=keep)
    return values, scale


@register_method("fp8")
class FP8(Method):
    summary = "FP8 E4M3 weights (and, w8a8, per-token FP8 activations): what H100/H200 and vLLM serve"
    kind = Kind.QUANTIZATION
    needs_calibration = True  # solver=gptq

    @dataclass(frozen=True)
    class Params:
        scheme: str = "w8a8"
        scales: str = "channel"
        solver: str = "rtn"

        def __post_init__(self):
            if self.scheme not in SCHEMES or self.scales not in SCALES or self.solver not in SOLVERS:
                raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, scales one of {', '.join(SCALES)} "
                                 f"and solver one of {', '.join(SOLVERS)}")

    space = {"scheme": Categorical(SCHEMES), "scales": Categorical(SCALES, searched=["channel"]),
             "solver": Categorical(SOLVERS, searched=["rtn"])}

    @torch.no_grad()
    def calibrates(self, params) -> bool:
        return params.solver != "rtn"

    def apply_(self, model, params, calib, seed):
        per_channel = params.scales == "channel"

        def write(lin, values, scale):
            lin.weight.copy_(values.to(lin.weight.dtype))
            record(lin, "weight", bits=8, scaled=True, float8="e4m3", scale_bits=32, group_size=None,
                   zero_point=False, qparams=QuantParams(scale, torch.zeros(scale.shape, dtype=torch.uint8)),
                   act_quant="fp8" if params.scheme == "w8a8" else None)
            if params.scheme == "w8a8":
                lin.register_forward_pre_hook(per_token_fp8)

        if params.solver == "rtn":
            for _, lin in block_linears(model):
                write(lin, *fp8_quantize(lin.weight, per_channel))
        else:
            calib = require(calib, "fp8(solver=gptq)")

            def solve(_i, layer, stats, _samples):
                modules = dict(layer.named_modules())
                for name, acc in stats.items():
                    lin = modules[name]
                    write(lin, *fp8_gptq(lin.weight, acc.H, per_channel, keep_zeros=is_sparse(lin)))

            sequential_(model, calib, lambda _n, lin: Hessian(lin), solve)
        cast_rest_to_fp16_(model)
