"""--format gguf: one .gguf file for llama.cpp (and ollama, LM Studio, which embed it), every tensor in its trial's
type: ggml block types exactly as the gguf method stored them (token_embd and output included), norms F32, float
casts in F16/BF16, untouched weights in the narrowest float type that holds them exactly. The folder holds
`model.gguf` and compactmind.json; `llama-cli -m DIR/model.gguf`, and transformers loads it with
`AutoModelForCausalLM.from_pretrained(DIR, gguf_file="model.gguf")` (it dequantizes, to the same floats).

Llama-family models only (the architecture llama.cpp's "llama" loader reads: Llama, Mistral-like, SmolLM). The
metadata (architecture, hyperparameters, tokenizer) is copied from the GGUF file the model was loaded from, or
made from the Hugging Face config and tokenizer (gguf-py's vocabulary readers). Tensor names are llama.cpp's
(gguf-py's name map), and attn_q / attn_k rows are permuted to llama.cpp's rotary layout (per head, the two
halves interleaved), as llama.cpp's own converter does; a row's blocks move with it, unchanged.

Refused before any work: structured pruning (per-layer shapes), k-bit groups of rtn/gptq/awq and SmoothQuant's
int8 (not a GGUF block type: search gguf(type=...) instead). Pruned weights are stored dense: GGUF has no sparsity.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compactmind import ggml
from compactmind.errors import ConfigError
from compactmind.files import atomic_folder
from compactmind.footprint import parameters
from compactmind.formats import entry, exact_float_dtype, record
from compactmind.packing import on_grid

FILE = "model.gguf"
TOLERANCE = 1e-4  # transformers dequantizes to the evaluated floats; a row permutation is exact
_KBIT = "stores k-bit groups that are not a GGUF block type; search gguf(type=...) instead"
_NOT_GGUF = {  # method: what it stores that a GGUF file cannot
    "l2_pruning": "removes channels and heads per block, which llama.cpp's loader cannot describe",
    "rtn": _KBIT, "gptq": _KBIT, "awq": _KBIT, "int8_sq": _KBIT,
    "fp8": "stores FP8 (E4M3) values, for which GGUF has no type",
    "drop": "removes blocks or sub-blocks, while llama.cpp's loader expects every layer",  # dynamic.DROP
}
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def refusal(pipelines: list[list[str]]) -> str | None:
    for methods in pipelines:
        for m in methods:
            if m in _NOT_GGUF:
                return f"--format gguf cannot hold {m}: it {_NOT_GGUF[m]}; or export --format packed."
    return None


def tolerance(manifest: dict) -> float:
    return TOLERANCE


def reload(folder: Path, device) -> nn.Module:
    """The file as transformers loads it (it dequantizes); when the trial measured what llama.cpp computes
    (gguf activations="ggml"), with llama.cpp's rounding of every linear's input added, so that it computes what
    the trial measured."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=FILE, dtype=torch.float32).to(device).eval()
    manifest = json.loads((folder / "compactmind.json").read_text())
    if manifest["format"].get("activations") == ggml.ACT_QUANT:
        round_as_llamacpp_(model, folder / FILE)
    return model


def round_as_llamacpp_(model: nn.Module, path: Path) -> int:
    """Round every linear's input of a model loaded from the GGUF file `path` as llama.cpp's CPU kernels round it
    for that tensor's type in the file (ggml.round_activations; none for float tensors); returns how many."""
    import gguf

    from compactmind.methods._gguf import round_inputs_

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    name_of = gguf_names(model)
    for hf_name, module, pname, _ in parameters(model):
        kind = types.get(name_of(hf_name) or "")
        if pname == "weight" and kind in ggml.TYPES:
            record(module, pname, ggml=kind, act_quant=ggml.ACT_QUANT)
    return round_inputs_(model)


def write(model: nn.Module, tokenizer, out: Path, manifest: dict, baseline_bits: int = 32) -> dict:
    """The trial's model as DIR/model.gguf; the metadata from the GGUF file it was loaded from when there is one
    (manifest["model"]["source_gguf"]), else from its config and tokenizer."""
    import gguf

    source = (manifest.get("model") or {}).get("source_gguf")
    source = Path(source) if source and Path(source).is_file() else None
    config = model.config
    if getattr(config, "model_type", None) not in ("llama", "mistral", "smollm3") and not source:
        raise ConfigError(f"--format gguf writes Llama-family models; this one is {config.model_type!r}.")
    tensors = list(_tensors(model))
    stored = sum(data.nbytes for _, data, _ in tensors)
    rounded = any(entry(m, p).act_quant == ggml.ACT_QUANT for _, m, p, _ in parameters(model))
    manifest = {**manifest, "format": {"name": "gguf", "file": FILE, "types": _type_counts(tensors),
                                       "activations": "ggml" if rounded else "float"},
                "stored_tensor_bytes": stored}

    def fill(folder: Path) -> None:
        writer = gguf.GGUFWriter(str(folder / FILE), "llama")
        if source is not None:
            _copy_metadata(writer, source)
        else:
            _metadata(writer, model, tokenizer)
        writer.add_file_type(gguf.LlamaFileType.GUESSED)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (folder / "compactmind.json").write_text(json.dumps(manifest, indent=2, default=str))

    atomic_folder(out, fill)
    return manifest


def gguf_names(model: nn.Module):
    """Hugging Face parameter name -> llama.cpp's tensor name (None where it has none), by gguf-py's name map."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    return lambda hf_name: names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _tensors(model: nn.Module):
    """(GGUF name, data, raw ggml type or None) of every parameter, a tied one once, in llama.cpp's layout."""
    import gguf

    config = model.config
    name_of = gguf_names(model)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    for hf_name, module, pname, p in parameters(model):
        name = name_of(hf_name)
        if name is None:
            raise ConfigError(f"--format gguf has no llama.cpp name for {hf_name}.")
        e = entry(module, pname)
        if e.format.ggml is not None:
            codes, values = ggml.quantize_columns(e.grid, p.detach().float().cpu(), 0)
            if not on_grid(values, p.detach().float().cpu(), p.dtype):
                raise ConfigError(f"{hf_name} is not on its recorded {e.format.ggml} grid; it cannot be exported.")
            data, raw = ggml.encode(e.grid, codes), ggml.TYPES[e.format.ggml].ggml
        else:
            data, raw = _float_data(p.detach().cpu(), hf_name)
        role = name.split(".")[-2] if name.startswith("blk.") else None
        if role in heads and data.ndim == 2:
            data = data[_rotary_rows(data.shape[0], heads[role])]
        yield name, np.ascontiguousarray(data), raw


def _float_data(t: torch.Tensor, name: str):
    import gguf

    dtype = torch.float32 if t.dim() == 1 else (exact_float_dtype(t) or torch.float32)
    if dtype == torch.bfloat16:
        return t.to(torch.bfloat16).view(torch.uint16).numpy().view(np.uint8), gguf.GGMLQuantizationType.BF16
    return t.to(dtype).numpy(), None


def _rotary_rows(rows: int, n_heads: int) -> np.ndarray:
    """llama.cpp's order of a q/k projection's rows: within each head, the rows of the two rotary halves
    interleaved (row 2i+j of a head is the HF row j*head_dim/2 + i)."""
    half = rows // n_heads // 2
    return np.arange(rows).reshape(n_heads, 2, half).transpose(0, 2, 1).reshape(-1)


def _type_counts(tensors) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, data, raw in tensors:
        key = raw.name if raw is not None else str(data.dtype).upper().replace("FLOAT", "F")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _copy_metadata(writer, source: Path) -> None:
    """Every key of the GGUF file the model came from (tokenizer, hyperparameters, names), but those that
    describe its own tensors."""
    import gguf

    for field in gguf.GGUFReader(str(source)).fields.values():
        if field.name.startswith(_SKIP_KEYS):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _metadata(writer, model: nn.Module, tokenizer) -> None:
    """llama.cpp's Llama keys from the Hugging Face config, and its tokenizer keys from the tokenizer files."""
    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(getattr(c, "rope_theta", None) or (c.rope_parameters or {}).get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(c.vocab_size)
    if tokenizer is None:
        raise ConfigError("--format gguf needs the model's tokenizer to write llama.cpp's vocabulary.")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        vocab = _vocab(Path(tmp))
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        gguf.SpecialVocab(tmp, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _vocab(folder: Path):
    import gguf

    for kind in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab, gguf.vocab.SentencePieceVocab):
        try:
            return kind(folder)
        except (FileNotFoundError, TypeError, RuntimeError, KeyError):  # not this kind (or its library is missing)
            continue
    raise ConfigError("--format gguf reads BPE (GPT-2 style) and SentencePiece/Llama tokenizers; this model's "
                      "tokenizer is neither.")
