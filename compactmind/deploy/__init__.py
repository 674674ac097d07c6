"""Deployment formats: how a trial's compressed model is written for the tools people serve it with. Each format is
one module here, named in FORMATS; the CLI's --format choices, the refusals and `export --verify` all read this
table (importing a format's module only when it is used, so the table costs nothing to import).

A format module provides:
    write(model, tokenizer, out, manifest, baseline_bits) -> manifest   the folder (or file), written atomically
    refusal(pipelines) -> str | None        why it cannot hold these pipelines (method names per pipeline)
    tolerance(manifest) -> float            how far a reloaded model's perplexity may stray (relative)
    reload(out, device) -> nn.Module        the written model loaded back as a user loads it
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str
    module: str  # under compactmind.deploy
    summary: str  # one line for --help

    def impl(self):
        return importlib.import_module(f"compactmind.deploy.{self.module}")


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("packed", "packed_folder", "compactmind's bit-packed folder (the exact accounted bytes; loads with "
                                      "trust_remote_code or compactmind)"),
    Format("compressed-tensors", "compressed_tensors", "what vLLM serves and transformers loads as it is"),
    Format("dense", "dense", "a plain FP16 (or BF16) checkpoint for any tool"),
    Format("gguf", "gguf", "one .gguf file for llama.cpp, ollama and LM Studio (trials of the gguf method)"),
]}


def get(name: str) -> Format:
    from compactmind.errors import ConfigError

    if name not in FORMATS:
        raise ConfigError(f"Unknown export format {name!r}; choose one of {', '.join(FORMATS)}.")
    return FORMATS[name]
