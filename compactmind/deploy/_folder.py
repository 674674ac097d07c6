"""What every Hugging Face folder format writes: config.json, generation config, tokenizer, model.safetensors and
compactmind.json (the trial's pipeline, protocol and figures)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn


def hf_config(model: nn.Module, extra: dict, dtype: str) -> dict:
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # a path of the machine it was made on
    config.pop("auto_map", None)
    config["dtype"] = dtype
    config.update(extra)
    return config


def save(model: nn.Module, tokenizer, folder: Path, tensors: dict, config: dict, manifest: dict,
         metadata: dict | None = None) -> None:
    """A Hugging Face folder: model.safetensors, config.json, generation config, tokenizer, compactmind.json."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata or {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "compactmind.json").write_text(json.dumps(manifest, indent=2, default=str))


def reload_with_transformers(folder: Path, device) -> nn.Module:
    """A folder loaded back through transformers alone, as a user loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


def pruned_or_reshaped(pipelines: list[list[str]], fmt: str, sparse_ok: bool, ggml_ok: bool = False) -> str | None:
    """The refusal every Hugging Face folder format shares: structured pruning and dropped blocks (per-layer shapes
    and layer counts a config cannot describe) and, unless sparse_ok, sparsity."""
    from compactmind.dynamic import DROP
    from compactmind.registry import Kind, get_method

    for methods in pipelines:
        if "gguf" in methods and not ggml_ok:
            return f"--format {fmt} cannot hold gguf's llama.cpp block types; use --format gguf (or dense)."
        if DROP in methods:
            return (f"--format {fmt} cannot hold a profile with dropped blocks or sub-blocks: a Hugging Face config "
                    "counts every layer; use --format packed.")
        if "l2_pruning" in methods:
            return (f"--format {fmt} cannot hold l2_pruning: it removes channels and heads per block, which a "
                    "Hugging Face config cannot describe; use --format packed.")
        pruned = [m for m in methods if get_method(m).kind == Kind.PRUNING]
        if pruned and not sparse_ok:
            return (f"--format {fmt} cannot hold {pruned[0]}: the compressed-tensors and transformers releases "
                    "installed here load no sparse format; use --format dense (the zeros written out) or --format "
                    "packed.")
    return None
