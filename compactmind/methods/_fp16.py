"""FP16 cast: store every weight in IEEE half precision (16 bits), the usual deployment format.

Every parameter is rounded to float16; the search simulates it by rounding and keeping the evaluation dtype.
The compression ratio against FP32 is exactly 0.5. No parameters, no data. (Micikevicius et al., "Mixed
Precision Training", 2018, for the format and its range.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactmind.methods._quant import cast_all_
from compactmind.registry import Kind, Method, register_method


@register_method("fp16")
class FP16(Method):
    kind = Kind.QUANTIZATION

    @dataclass(frozen=True)
    class Params:
        pass

    space = {}

    def apply_(self, model, params, calib, seed):
        cast_all_(model, torch.float16, 16)
