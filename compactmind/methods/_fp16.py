"""FP16 cast: store every weight in IEEE half precision (16 bits), the usual deployment format.

Every parameter is rounded to float16; the search simulates it by rounding and keeping the evaluation dtype.
The compression ratio against FP32 is exactly 0.5. No parameters, no data. (Micikevicius et al., "Mixed
Precision Training", 2018, for the format and its range.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactmind.footprint import narrow_to
from compactmind.registry import Kind, Method, register_method


def round_to_(p: torch.Tensor, dtype: torch.dtype) -> None:
    p.copy_(p.to(dtype).to(p.dtype))


@register_method("fp16")
class FP16(Method):
    kind = Kind.QUANTIZATION

    @dataclass(frozen=True)
    class Params:
        pass

    space = {}

    @torch.no_grad()
    def apply_(self, model, params, calib, seed):
        seen: set[int] = set()
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    round_to_(p.data, torch.float16)
                narrow_to(module, name, 16)
