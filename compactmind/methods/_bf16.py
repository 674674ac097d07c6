"""BF16 cast: store every weight in bfloat16 (8 exponent bits like FP32, 7 mantissa bits), the training format
of most current LLMs (Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training", 2019).

Every parameter is rounded to bfloat16; the ratio against FP32 is exactly 0.5. It never overflows where FP16
might, at the cost of coarser rounding. No parameters, no data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactmind.methods._quant import cast_all_
from compactmind.registry import Kind, Method, register_method


@register_method("bf16")
class BF16(Method):
    kind = Kind.QUANTIZATION

    @dataclass(frozen=True)
    class Params:
        pass

    space = {}

    def apply_(self, model, params, calib, seed):
        cast_all_(model, torch.bfloat16, 16)
