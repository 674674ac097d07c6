"""--format dense: the compressed weights as a plain FP16 (BF16 when a step cast to BF16) Hugging Face checkpoint,
for lm-evaluation-harness and any tool; k-bit weights are exact in FP16 only up to FP16's 11-bit mantissa, and
the zeros of a pruned model are written out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compactmind.deploy._folder import hf_config, pruned_or_reshaped, reload_with_transformers, save
from compactmind.files import atomic_folder
from compactmind.footprint import parameters
from compactmind.formats import entry, exact_float_dtype

TOLERANCE = 1e-2  # a dense FP16 checkpoint rounds k-bit weights to FP16


def write(model: nn.Module, tokenizer, out: Path, manifest: dict, baseline_bits: int = 32) -> dict:
    """The compressed weights as a plain FP16 (or BF16) checkpoint."""
    bf16 = any(entry(m, p).format.bits == 16 and exact_float_dtype(t, 16) == torch.bfloat16
               for _, m, p, t in parameters(model))
    dtype = torch.bfloat16 if bf16 else torch.float16
    tensors = {name: t.detach().cpu().to(dtype).contiguous() for name, _, _, t in parameters(model)}
    manifest = {**manifest, "format": {"name": "dense", "dtype": str(dtype)[6:]},
                "stored_tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    atomic_folder(out, lambda folder: save(model, tokenizer, folder, tensors, hf_config(model, {}, str(dtype)[6:]),
                                            manifest))
    return manifest


def refusal(pipelines: list[list[str]]) -> str | None:
    return pruned_or_reshaped(pipelines, "dense", sparse_ok=True, ggml_ok=True)


def tolerance(manifest: dict) -> float:
    return TOLERANCE


def reload(folder: Path, device) -> nn.Module:
    return reload_with_transformers(folder, device)
