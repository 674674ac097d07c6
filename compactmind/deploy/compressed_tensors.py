"""--format compressed-tensors: what vLLM serves, and what transformers loads with the compressed-tensors package
installed.

compressed-tensors (https://github.com/neuralmagic/compressed-tensors): each block linear that a pipeline
quantized becomes a quantization scheme in config.json's `quantization_config`, grouped by settings:
  - k-bit weights (RTN, GPTQ, AWQ; any mix of bit widths per layer, as a dynamic profile makes): format
    `pack-quantized` (W{k}A16): codes packed into int32, `weight_scale` per group (or per output channel),
    `weight_zero_point` packed likewise when asymmetric. compactmind's unsigned codes c with zero point z become
    the signed codes c - 2^(k-1) with zero point z - 2^(k-1): the same weights, bit for bit.
  - FP8 (E4M3) weights: format `float-quantized`, FP8 values with FP32 scales per channel or per tensor; with
    W8A8-FP8 activations quantized per token, dynamically (vLLM's FP8 kernels on H100/H200).
  - SmoothQuant W8A8: format `int-quantized`: int8 weights with a scale per output channel, activations
    quantized per token, dynamically, at every forward (int8 kernels in vLLM).
  - weights outside the quantized linears are stored in the narrowest float type that holds them exactly.
`"dequantize": true` in the quantization config tells transformers to unpack the weights on load (on a CPU it
has no int kernels); vLLM reads the packed tensors. transformers does not quantize activations on that path,
so a W8A8 model's logits there differ slightly from the evaluated ones (vLLM applies them).

Refused, before any work, with the reason: structured pruning (per-layer shapes a config cannot describe) and
unstructured or N:M sparsity (the compressed-tensors release installed with compactmind and transformers 5.x
load no sparse format; `--format dense` writes the zeros, `--format packed` stores them compactly).

`dense`: the compressed weights in FP16 (BF16 when a step cast to BF16), a plain checkpoint for
lm-evaluation-harness and any tool; k-bit weights are exact in FP16 only up to FP16's 11-bit mantissa.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compactmind.deploy._folder import hf_config, pruned_or_reshaped, reload_with_transformers, save
from compactmind.errors import ConfigError
from compactmind.files import atomic_folder
from compactmind.footprint import parameters
from compactmind.formats import entry, exact_float_dtype
from compactmind.models import block_linears

TOLERANCE = 1e-4  # k-bit weights are stored exactly
W8A8_TOLERANCE = 2e-2  # transformers does not quantize a W8A8 model's activations (vLLM does)


def write(model: nn.Module, tokenizer, out: Path, manifest: dict, baseline_bits: int = 32) -> dict:
    """The trial's model in the compressed-tensors format (see the module docstring)."""
    try:
        from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                     QuantizationStatus)
    except ImportError:
        raise ConfigError("--format compressed-tensors needs the compressed-tensors package; "
                          "pip install 'compactmind[export]'.") from None
    groups: dict[str, tuple] = {}
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, linear in block_linears(model):
        e = entry(linear)
        if not e.format.scaled:
            continue
        weights, acts, kind = _scheme_args(name, linear, e, QuantizationArgs)
        scheme = QuantizationScheme(targets=[name], weights=weights, input_activations=acts)
        state = {"weight": linear.weight.detach().float().cpu(), "weight_scale": e.qparams.scale.float().cpu()}
        if e.format.zero_point:
            half = 2 ** (e.format.bits - 1)
            state["weight_zero_point"] = (e.qparams.zero.to(torch.int16) - half).to(torch.int8).cpu()
        compressor = PackedQuantizationCompressor if kind == PACKED else NaiveQuantizationCompressor
        for key, value in compressor.compress(state, scheme).items():
            tensors[f"{name}.{key}"] = value.contiguous()  # FP16 values, kept in FP32: dequantized exactly
        key = json.dumps([weights.model_dump(), acts.model_dump() if acts else None], sort_keys=True, default=str)
        groups.setdefault(key, (weights, acts, kind, []))[3].append(name)
        quantized.add(f"{name}.weight")
    if not groups:
        raise ConfigError("This trial quantizes no layer, so compressed-tensors has nothing to describe; use "
                          "--format dense.")
    rest = {name: t.detach().cpu().to(exact_float_dtype(t) or torch.float32).contiguous()
            for name, _, _, t in parameters(model) if name not in quantized}
    tensors.update(rest)
    formats = {g[2] for g in groups.values()}
    config = QuantizationConfig(
        config_groups={f"group_{i}": QuantizationScheme(targets=names, weights=w, input_activations=a)
                       for i, (w, a, _, names) in enumerate(groups.values())},
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED, ignore=["lm_head"])
    qc = {**config.model_dump(exclude_none=True), "quant_method": "compressed-tensors", "dequantize": True}
    if qc["format"] == "mixed-precision":  # each group says its own format
        for group, (_, _, kind, _) in zip(qc["config_groups"].values(), groups.values()):
            group["format"] = kind
    dtype = "float16" if all(t.dtype == torch.float16 for t in rest.values()) else "float32"
    manifest = {**manifest, "format": {"name": "compressed-tensors", "format": qc["format"],
                                       "activations": any(g[1] is not None for g in groups.values())},
                "stored_tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    atomic_folder(out, lambda folder: save(model, tokenizer, folder, tensors,
                                            hf_config(model, {"quantization_config": qc}, dtype), manifest))
    return manifest


PACKED, INT, FLOAT = "pack-quantized", "int-quantized", "float-quantized"


def _scheme_args(name: str, linear: nn.Linear, e, QuantizationArgs):
    """(weight args, activation args or None, compressed-tensors format) of one quantized linear."""
    f, cols = e.format, linear.in_features
    if f.float8:
        strategy = "tensor" if e.qparams.scale.numel() == 1 else "channel"
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
        acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True) \
            if e.act_quant == "fp8" else None
        return weights, acts, FLOAT
    group = f.group_size if f.group_size and f.group_size < cols else None  # one group per row: a channel
    if group and cols % group:
        raise ConfigError(f"{name} has {cols} input columns, not a multiple of group_size {group}; "
                          "compressed-tensors stores whole groups only; use --format packed.")
    weights = QuantizationArgs(num_bits=f.bits, type="int", symmetric=not f.zero_point,
                               strategy="group" if group else "channel", group_size=group)
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True) \
        if e.act_quant else None
    return weights, acts, INT if acts else PACKED


def refusal(pipelines: list[list[str]]) -> str | None:
    return pruned_or_reshaped(pipelines, "compressed-tensors", sparse_ok=False)


def tolerance(manifest: dict) -> float:
    return W8A8_TOLERANCE if manifest["format"].get("activations") else TOLERANCE


def reload(folder: Path, device) -> nn.Module:
    return reload_with_transformers(folder, device)
