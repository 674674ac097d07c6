"""Float casts: store every weight in a 16-bit float format. FP16 is IEEE half precision, the usual deployment
format (Micikevicius et al., "Mixed Precision Training", 2018); BF16 keeps FP32's 8 exponent bits with 7 mantissa
bits, the training format of most current LLMs (Kalamkar et al., "A Study of BFLOAT16 for Deep Learning
Training", 2019): it never overflows where FP16 might, at the cost of coarser rounding.

Every parameter is rounded to the format; the search simulates it by rounding and keeping the evaluation dtype.
The compression ratio against FP32 is exactly 0.5. No parameters, no data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compactmind.methods._quant import cast_all_
from compactmind.registry import Kind, Method, register_method


class Cast(Method):
    kind = Kind.QUANTIZATION
    dtype: ClassVar[torch.dtype]

    @dataclass(frozen=True)
    class Params:
        pass

    space = {}

    def apply_(self, model, params, calib, seed):
        cast_all_(model, self.dtype)


@register_method("fp16")
class FP16(Cast):
    dtype = torch.float16
    summary = "every weight in IEEE half precision (ratio 0.5 against FP32)"


@register_method("bf16")
class BF16(Cast):
    dtype = torch.bfloat16
    summary = "every weight in bfloat16 (ratio 0.5 against FP32; never overflows)"
