"""Pure tensor functions for quantization (fake quantization: quantize, then dequantize in the input dtype)."""

from __future__ import annotations

import torch
from torch import nn

from compactmind.footprint import narrow_to
from compactmind.models import block_linears


def quantize_per_row_(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel round-to-nearest: one scale max|row| / (2^(bits-1) - 1) per row."""
    qmax = 2 ** (bits - 1) - 1
    wf = w.float()
    scale = wf.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / qmax
    return (wf / scale).round().clamp(-qmax, qmax).mul(scale).to(w.dtype)


def quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric dynamic per-token quantization of activations: one scale per token (last dim = channels)."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return (xf / scale).round().clamp(-qmax, qmax).mul(scale).to(x.dtype)


@torch.no_grad()
def cast_rest_to_fp16_(model: nn.Module) -> None:
    """Round every weight outside the block linears through FP16 and record it as 16-bit.

    Quantized checkpoints (GPTQ, AWQ, SmoothQuant) keep embeddings, norms and the head in FP16; the search
    simulates that so the accounting and the measured perplexity describe the same model.
    """
    quantized = {id(m.weight) for _, m in block_linears(model)}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in quantized:
                continue
            if id(p) not in seen:
                seen.add(id(p))
                p.data.copy_(p.data.to(torch.float16).to(p.dtype))
            narrow_to(module, name, 16)

