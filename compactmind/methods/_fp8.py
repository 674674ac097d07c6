"""FP8 (E4M3) quantization, what H100/H200 serve natively (Micikevicius et al., "FP8 Formats for Deep Learning",
2022; vLLM's W8A8-FP8 and W8A16-FP8 schemes).

Every block linear's weight is stored as E4M3 values (4 exponent bits, 3 mantissa bits, largest 448) times a
scale: one per output channel (max|row| / 448) or one for the whole tensor, kept in FP32 as vLLM loads them. With
`scheme=w8a8` the inputs of each linear are also quantized to E4M3 at every forward, dynamically, one scale per
token (max|x| / 448); `w8a16` keeps them in the evaluation precision. Embeddings, norms and the head are kept in
FP16. No data is used. `export --format compressed-tensors` writes it as `float-quantized`, the layout vLLM loads.

Parameters: `scheme` (w8a8 or w8a16), `scales` (channel or tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactmind.formats import QuantParams, record
from compactmind.methods._quant import cast_rest_to_fp16_
from compactmind.models import block_linears
from compactmind.packed import FP8_MAX, per_token_fp8
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Categorical

SCHEMES, SCALES = ("w8a8", "w8a16"), ("channel", "tensor")


def fp8_quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values times the scale in FP32, the FP32 scale [rows, 1] or [1, 1])."""
    wf = w.float()
    amax = wf.abs().amax(dim=1, keepdim=True) if per_channel else wf.abs().amax().reshape(1, 1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale, scale


@register_method("fp8")
class FP8(Method):
    summary = "FP8 E4M3 weights (and, w8a8, per-token FP8 activations): what H100/H200 and vLLM serve"
    kind = Kind.QUANTIZATION

    @dataclass(frozen=True)
    class Params:
        scheme: str = "w8a8"
        scales: str = "channel"

        def __post_init__(self):
            if self.scheme not in SCHEMES or self.scales not in SCALES:
                raise ValueError(f"scheme must be one of {', '.join(SCHEMES)} and scales one of {', '.join(SCALES)}")

    space = {"scheme": Categorical(SCHEMES), "scales": Categorical(SCALES, searched=["channel"])}

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        for _, lin in block_linears(model):
            values, scale = fp8_quantize(lin.weight, params.scales == "channel")
            lin.weight.copy_(values.to(lin.weight.dtype))
            record(lin, "weight", bits=8, scaled=True, float8="e4m3", scale_bits=32, group_size=None,
                   zero_point=False, qparams=QuantParams(scale, torch.zeros(scale.shape, dtype=torch.uint8)),
                   act_quant="fp8" if params.scheme == "w8a8" else None)
            if params.scheme == "w8a8":
                lin.register_forward_pre_hook(per_token_fp8)
        cast_rest_to_fp16_(model)
