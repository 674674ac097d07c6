"""compactmind's packed checkpoint format, and its loader.

This file depends only on torch, safetensors and transformers, so `compactmind export` copies it into every
exported folder as `modeling_compactmind.py`: anyone can load the folder without compactmind installed,
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
or, with compactmind installed, `compactmind.packed.load(folder)`. Either returns the model's own Hugging Face
class (e.g. LlamaForCausalLM) with the compressed weights unpacked into it.

The folder: config.json (with "auto_map" pointing here), tokenizer files, model.safetensors, compactmind.json.
compactmind.json holds the pipeline, protocol and figures of the trial, and under "format"/"tensors" one entry
per stored tensor NAME (a state-dict name):
    shape        [rows, cols] (or any shape for float tensors)
    dtype        float16 | bfloat16 | float32: the dtype of the values (float tensors) or of the unpacked weight
    bits         null for float values; k (2..8) for integer codes
    group_size   columns per scale group (0: one group per row)
    zero_point   true: a k-bit zero point per group is stored; false: the zero point is 2^(k-1)
    sparse       true: only the kept weights are stored, with a bitmap of the kept positions
and under "format"/"removed" the modules depth pruning removed (path -> identity_block | zero_attention |
zero_mlp | identity): the loader puts those modules in their place (they have no weights).
    act_quant    "per_token_int8" / "per_token_fp8": inputs quantized per token at every forward (W8A8), else null
    float8       "e4m3": the codes are FP8 E4M3 values, a byte each, times NAME.scale (FP32, per row or one)
and model.safetensors holds, for NAME:
    NAME                 float values (dense, not quantized)
    NAME.values          float values of the kept positions, row-major (sparse, not quantized)
    NAME.codes           uint8: the integer codes of the kept positions (all when dense), row-major, as a
                         little-endian bit stream of k bits per code (k = 8: one byte each)
    NAME.scale           float16 [rows, groups]: dequantized weight = scale * (code - zero)
    NAME.zero            uint8: the zero points [rows, groups], row-major, as a k-bit stream (when zero_point)
    NAME.mask            uint8: the kept-position bitmap, 1 bit per weight, little-endian bit stream
    NAME.group_index     int32 [cols] (only when structured pruning removed columns after quantization): the
                         scale group of each column, instead of column // group_size
Tensors the manifest does not list are ordinary float tensors stored under their own name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

FORMAT_VERSION = 2
MANIFEST = "compactmind.json"
WEIGHTS = "model.safetensors"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes (< 2^bits) as a little-endian bit stream in bytes."""
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    stream = ((codes.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    if bits == 8:
        return packed[:count].clone()
    stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: count * bits]
    return (stream.view(count, bits) << torch.arange(bits, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_tensor(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor NAME, from its stored parts."""
    shape = tuple(spec["shape"])
    dtype = _DTYPES[spec["dtype"]]
    numel = math.prod(shape)
    mask = None
    if spec.get("sparse"):
        mask = unpack_bits(tensors[f"{name}.mask"], 1, numel).bool()
    kept = numel if mask is None else int(mask.sum())
    if spec.get("float8"):
        fp8 = tensors[f"{name}.codes"].view(torch.float8_e4m3fn).to(torch.float32)
        scale = tensors[f"{name}.scale"].to(torch.float32).expand(shape[0], shape[1]).reshape(-1)
        values = fp8 * (scale if mask is None else scale[mask])
    elif spec.get("bits") is None:
        values = tensors[f"{name}.values"].to(torch.float32) if mask is not None else tensors[name]
    else:
        bits = spec["bits"]
        codes = unpack_bits(tensors[f"{name}.codes"], bits, kept).to(torch.float32)
        rows, cols = shape
        group = spec["group_size"] or cols
        column_group = tensors[f"{name}.group_index"].long() if f"{name}.group_index" in tensors \
            else torch.arange(cols) // group
        scales = tensors[f"{name}.scale"]
        scale = scales.to(torch.float32)[:, column_group].reshape(-1)
        if spec["zero_point"]:
            zeros = unpack_bits(tensors[f"{name}.zero"], bits, scales.numel()).view(scales.shape).to(torch.float32)
            zero = zeros[:, column_group].reshape(-1)
        else:
            zero = torch.full((numel,), float(2 ** (bits - 1)))
        if mask is not None:
            scale, zero = scale[mask], zero[mask]
        values = scale * (codes - zero)
    if mask is None:
        return values.reshape(shape).to(dtype)
    out = torch.zeros(numel, dtype=torch.float32)
    out[mask] = values.to(torch.float32)
    return out.reshape(shape).to(dtype)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric dynamic per-token quantization of activations: one scale max|x| / (2^(bits-1) - 1) per token
    (last dim = channels). compactmind's W8A8 methods and this loader use this one function."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return (xf / scale).round().clamp(-qmax, qmax).mul(scale).to(x.dtype)


def per_token_int8(_module, args):
    """Forward pre-hook: the module's input quantized per token to INT8 (W8A8)."""
    return (quantize_per_token(args[0], 8),) + tuple(args[1:])


FP8_MAX = 448.0  # the largest E4M3 value


def quantize_per_token_fp8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 (E4M3) activations, as vLLM's W8A8-FP8 kernels make them: one scale max|x| / 448 per
    token, values rounded to E4M3."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return ((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def per_token_fp8(_module, args):
    """Forward pre-hook: the module's input quantized per token to FP8 (W8A8-FP8)."""
    return (quantize_per_token_fp8(args[0]),) + tuple(args[1:])


ACTIVATION_HOOKS = {"int8": per_token_int8, "fp8": per_token_fp8}


class IdentityBlock(torch.nn.Module):
    """A decoder block depth pruning removed: its input passes through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class ZeroAttention(torch.nn.Module):
    """An attention sub-block depth pruning removed: it adds nothing to the residual."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class ZeroMLP(torch.nn.Module):
    """An MLP sub-block depth pruning removed: it adds nothing to the residual."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


REMOVED = {"identity_block": IdentityBlock, "zero_attention": ZeroAttention, "zero_mlp": ZeroMLP,
           "identity": torch.nn.Identity}


def removed_modules(model: torch.nn.Module) -> dict[str, str]:
    """The modules depth pruning replaced (path -> kind): what the manifest lists so the loader replaces them."""
    kinds = {cls: name for name, cls in REMOVED.items()}
    return {path: kinds[type(m)] for path, m in model.named_modules() if path and type(m) in kinds}


def replace_removed(model: torch.nn.Module, removed: dict[str, str]) -> None:
    for path, kind in removed.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, REMOVED[kind]())


def resize_linears(model: torch.nn.Module, shapes: dict[str, tuple]) -> None:
    """Structured pruning removed rows/columns: give each linear its stored shape (and attention modules the
    matching number of query heads per key/value head)."""
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        if isinstance(module, torch.nn.Linear) and param == "weight" and tuple(module.weight.shape) != shape:
            module.weight = torch.nn.Parameter(module.weight.new_empty(shape), requires_grad=False)
            module.out_features, module.in_features = shape
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.new_empty(shape[0]), requires_grad=False)
    for module in model.modules():
        if all(hasattr(module, a) for a in ("q_proj", "k_proj", "head_dim", "num_key_value_groups")):
            module.num_key_value_groups = module.q_proj.out_features // module.k_proj.out_features


def load(folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """The exported model, unpacked into its Hugging Face class, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    fmt = manifest["format"]
    if fmt.get("version") != FORMAT_VERSION:
        raise ValueError(f"{folder} holds packed format version {fmt.get('version')}; this loader reads "
                         f"version {FORMAT_VERSION}.")
    specs = fmt["tensors"]
    config = AutoConfig.from_pretrained(folder)
    config.auto_map = {}  # build the architecture's own class, not this loader
    model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[fmt["dtype"]])
    replace_removed(model, fmt.get("removed", {}))
    resize_linears(model, {n: tuple(s["shape"]) for n, s in specs.items()})
    stored = load_file(folder / WEIGHTS)
    state = {name: unpack_tensor(name, spec, stored) for name, spec in specs.items()}
    parts = {f"{n}.{suffix}" for n in specs for suffix in ("values", "codes", "scale", "zero", "mask", "group_index")}
    state.update({k: v for k, v in stored.items() if k not in parts and k not in specs})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: the stored tensors do not match the model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}).")
    if missing:
        model.tie_weights()
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        kind = (spec.get("act_quant") or "").removeprefix("per_token_")
        if kind:
            modules[name.rpartition(".")[0]].register_forward_pre_hook(ACTIVATION_HOOKS[kind])
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def source_info(folder: str | Path) -> dict:
    """What the folder stores, as a model loaded from it is described: its format and bytes per weight."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    weights = sum(math.prod(spec["shape"]) for spec in manifest["format"]["tensors"].values())
    stored = manifest["stored_tensor_bytes"]
    return {"format": f"compactmind packed ({manifest.get('pipeline')})", "bytes": stored, "weights": weights,
            "bits_per_weight": 8 * stored / weights}


class CompactModelForCausalLM:
    """The entry `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` reaches through
    config.json's auto_map: it returns the unpacked model of the architecture's own class."""

    @classmethod
    def register_for_auto_class(cls, auto_class=None):
        return None

    @classmethod
    def from_pretrained(cls, folder, *args, dtype=None, torch_dtype=None, device_map=None, **kwargs):
        device = device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else "cpu"
        wanted = dtype or torch_dtype
        if isinstance(wanted, str):
            wanted = _DTYPES.get(wanted)
        return load(folder, dtype=wanted, device=device)
