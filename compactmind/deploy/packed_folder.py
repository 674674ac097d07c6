"""--format packed: compactmind's own folder (packed.py describes it), each weight stored exactly as its ledger
entry's layout says (formats.layout), so the stored tensors take exactly the bytes the trial's recorded size counts.
It holds every pipeline compactmind can make; it loads with `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` (the loader is copied into the folder) or `compactmind.packed.load(folder)`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from compactmind import packed
from compactmind.deploy._folder import hf_config, save
from compactmind.files import atomic_folder
from compactmind.formats import FLOAT_NAMES
from compactmind.packing import packed_state, tensor_bytes

TOLERANCE = 1e-4  # relative: the same weights on the same windows give the same perplexity to ~1e-6


def write(model: nn.Module, tokenizer, out_dir: Path, manifest: dict, baseline_bits: int = 32) -> dict:
    """Write the packed folder atomically (a temporary sibling, then rename); returns the manifest written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(out_dir)
    specs, tensors = packed_state(model, baseline_bits)
    dtype = FLOAT_NAMES[next(model.parameters()).dtype]
    manifest = {**manifest, "stored_tensor_bytes": tensor_bytes(tensors),
                "format": {"version": packed.FORMAT_VERSION, "dtype": dtype, "tensors": specs,
                           "removed": packed.removed_modules(model)}}
    loader = {"AutoModelForCausalLM": "modeling_compactmind.CompactModelForCausalLM"}
    config = hf_config(model, {"auto_map": loader}, dtype)

    def fill(folder: Path) -> None:
        save(model, tokenizer, folder, tensors, config, manifest,
                    {"format": "compactmind-packed", "version": str(packed.FORMAT_VERSION)})
        shutil.copyfile(Path(packed.__file__), folder / "modeling_compactmind.py")

    atomic_folder(out_dir, fill)
    return manifest


def refusal(pipelines: list[list[str]]) -> str | None:
    if any("gguf" in methods for methods in pipelines):
        return "--format packed does not store llama.cpp block types; use --format gguf (or dense)."
    return None


def tolerance(manifest: dict) -> float:
    return TOLERANCE


def reload(folder: Path, device) -> nn.Module:
    return packed.load(folder, device=device)
