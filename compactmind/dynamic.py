"""Dynamic compression: a compression option per unit (a decoder block, a sub-block, a linear layer, the token
embedding or the head), assembled from a database of pre-compressed units.

EvoPress (Sieberling, Kuznedelev, Kurtic, Alistarh, "EvoPress: Accurate Dynamic Model Compression via
Evolutionary Search", ICML 2025) builds such a database once: each level is applied uniformly to the whole model
with the normal layer-by-layer calibration loop, and every unit's compressed weights are kept. A trial then
assembles a profile, one option per unit, by swapping those units into the model: it compresses nothing, its
size is exact from the stored per-unit bytes before any evaluation, and an assembly swaps only the units whose
option differs from the model's current profile (Assembly).

A unit's options, indexed from 0 (compresses least) in order of bytes:
  - the study's levels (its candidate pipelines), as each left that unit when applied uniformly;
  - with depth pruning, `drop`: a decoder block replaced by the identity, or a sub-block (attention or MLP,
    with the norm only it reads) by a module whose output is zero, so the residual passes through; its
    weights count nothing;
  - the token embedding (with the head when tied) and an untied head, as units: their own options (FP16, 8-bit
    and 4-bit round-to-nearest per row group; GGUF types when the levels are GGUF types).
Weights outside every unit (the final norm; a linear granularity's block norms; the embeddings when they are
not units) take one setting for the whole study: that of the level that compresses most (FP16 when it
quantizes), recorded as `rest_from`.

The database keeps every block parameter of every level on disk in the packed format (packed.py), in a folder
keyed by the content of what made it: the weights' fingerprint, the calibration tokens' digest, the protocol,
the level's text and its methods' versions. Each level's manifest holds its tensors' bytes and a sha256 of its
files; a level whose files do not match is rebuilt, never read. A resumed run or another worker reads the levels
back; units are kept in memory (on the model's device) when every level fits in half the free memory, else read
from disk (only the swapped units) per assembly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from compactmind import interrupt, packed
from compactmind import pipeline as pl
from compactmind.errors import ConfigError
from compactmind.files import atomic_folder
from compactmind.footprint import Footprint, Reference, parameters
from compactmind.formats import Entry, QuantParams, Sparsity, TensorFormat, entry, record, stored_bytes
from compactmind.identity import fingerprint, method_versions
from compactmind.models import blocks_prefix, decoder_layers
from compactmind.packing import pack_tensor
from compactmind.registry import get_method

log = logging.getLogger(__name__)

DB_VERSION = 2
DROP = "drop"


# ---- units and profiles -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    name: str  # the trial parameter: "block.3", "block.3.self_attn", "block.3.mlp.down_proj", "embed", "head"
    paths: tuple[str, ...]  # the modules it swaps (a sub-block with the norm only it reads)
    block: int  # -1 for the embedding and the head
    kind: str  # "block", "attn", "mlp", "linear" or "embedding"

    @property
    def path(self) -> str:
        return self.paths[0]


def units_of(model: nn.Module, granularity: str, embeddings: bool = False) -> list[Unit]:
    layers, prefix = decoder_layers(model), blocks_prefix(model)
    units = []
    for i, layer in enumerate(layers):
        base = f"{prefix}.{i}"
        if granularity == "block":
            units.append(Unit(f"block.{i}", (base,), i, "block"))
        elif granularity == "sublayer":
            units += [Unit(f"block.{i}.self_attn", (f"{base}.self_attn", f"{base}.input_layernorm"), i, "attn"),
                      Unit(f"block.{i}.mlp", (f"{base}.mlp", f"{base}.post_attention_layernorm"), i, "mlp")]
        else:
            units += [Unit(f"block.{i}.{n}", (f"{base}.{n}",), i, "linear") for n, m in layer.named_modules()
                      if isinstance(m, nn.Linear)]
    if embeddings:
        names = {id(m): n for n, m in model.named_modules()}
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        units.append(Unit("embed", (names[id(embed)],), -1, "embedding"))
        if head is not None and head.weight is not embed.weight:
            units.append(Unit("head", (names[id(head)],), -1, "embedding"))
    return units


@dataclass(frozen=True)
class Profile:
    """One option index per unit."""

    levels: tuple[int, ...]


@dataclass(frozen=True)
class Option:
    """One choice of a unit: its label, its stored bytes, and the block-linear weights it zeroes or removes."""

    label: str
    bytes: int
    pruned: int = 0
    removed: int = 0


# ---- a level's tensors on disk: packed tensors plus each weight's ledger entry ---------------------------------


def _ledger_json(e: Entry) -> dict:
    f = e.format
    return {"bits": f.bits, "scaled": f.scaled, "group_size": f.group_size, "zero_point": f.zero_point,
            "sparsity": f.sparsity.value, "n": f.n, "m": f.m, "cast": f.cast, "ggml": f.ggml, "float8": f.float8,
            "scale_bits": f.scale_bits, "pruned": e.pruned}


def _entry_from(ledger: dict, spec: dict, name: str, tensors) -> Entry:
    fmt = TensorFormat(bits=ledger["bits"], scaled=ledger["scaled"], group_size=ledger["group_size"],
                       zero_point=ledger["zero_point"], sparsity=Sparsity(ledger["sparsity"]), n=ledger["n"],
                       m=ledger["m"], cast=ledger.get("cast"), ggml=ledger.get("ggml"), float8=ledger.get("float8"),
                       scale_bits=ledger.get("scale_bits", 16))
    act = (spec.get("act_quant") or "").removeprefix("per_token_") or None
    if fmt.ggml:
        return Entry(fmt, None, ledger["pruned"], act)
    qparams = None
    if fmt.scaled:
        scale = tensors(f"{name}.scale")
        zero = (packed.unpack_bits(tensors(f"{name}.zero"), fmt.bits, scale.numel()).view(scale.shape)
                if fmt.zero_point else torch.full(scale.shape, 2 ** (fmt.bits - 1), dtype=torch.uint8))
        groups = tensors(f"{name}.group_index").long() if f"{name}.group_index" in tensors.names else None
        qparams = QuantParams(scale, zero, groups)
    return Entry(fmt, qparams, ledger["pruned"], act)


class _Tensors:
    """Lazy access to the tensors of a safetensors file (memory-mapped: reading one unit reads its bytes only)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), "pt")
        self.names = set(self._file.keys())
        self.read = 0  # bytes read so far

    def __call__(self, name: str) -> torch.Tensor:
        t = self._file.get_tensor(name)
        self.read += t.numel() * t.element_size()
        return t

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one packed weight (packed.py names them NAME and NAME.<part>)."""
        wanted = [name] + [f"{name}.{p}" for p in ("values", "codes", "scale", "zero", "mask", "group_index", "ggml")]
        return {n: self(n) for n in wanted if n in self.names}


def _pack_params(named, baseline_bits: int) -> tuple[dict, dict]:
    """(manifest items, stored tensors) of (name, module, parameter name) triples, with their ledger entries."""
    manifest, tensors = {}, {}
    for name, module, pname in named:
        spec, out = pack_tensor(name, module, pname, baseline_bits)
        e = entry(module, pname)
        manifest[name] = {"spec": spec, "ledger": _ledger_json(e),
                          "bytes": stored_bytes(getattr(module, pname), e, baseline_bits)}
        tensors.update(out)
    return manifest, tensors


def _unpack_param(name: str, item: dict, tensors: _Tensors) -> tuple[torch.Tensor, Entry]:
    spec = item["spec"]
    e = _entry_from(item["ledger"], spec, name, tensors)
    if e.format.ggml:  # llama.cpp blocks: decoded here (the exported packed loader never meets them)
        from compactmind import ggml

        grid, codes = ggml.decode(tensors(f"{name}.ggml").numpy(), e.format.ggml, spec["shape"][1])
        return ggml.values(grid, codes).to(packed._DTYPES[spec["dtype"]]), dataclasses.replace(e, grid=grid)
    return packed.unpack_tensor(name, spec, tensors.parts(name)), e


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass
class Level:
    """One level of the database: the study's pipeline applied uniformly, every block parameter kept."""

    pipeline: pl.Pipeline
    folder: Path
    manifest: dict
    ratio: float  # of its uniform application
    _tensors: _Tensors | None = None

    @property
    def params(self) -> dict:
        return self.manifest["params"]

    def tensors(self) -> _Tensors:
        if self._tensors is None:
            self._tensors = _Tensors(self.folder / "units.safetensors")
        return self._tensors


# ---- building or reading the database -----------------------------------------------------------------------


def open_db(executor, levels: list[pl.Pipeline], granularity: str, root: Path, key: dict,
            on_level: Callable[[int, int, str, str], None] | None = None, depth: bool = False,
            embeddings: bool = False) -> "LevelDB":
    """The level database of these levels: each level read from `root` when a run built it before (and its
    files are whole), else built now (applied uniformly through `executor`) and written there. `key`
    identifies by content the model, the calibration data and the protocol."""
    if granularity != "block":
        for level in levels:
            for step in level.steps:
                if not get_method(step.method).separable:
                    raise ConfigError(f"{step.method} changes weights outside each linear layer (norms or shapes), "
                                      f"so its {'sub-blocks' if granularity == 'sublayer' else 'linears'} cannot "
                                      "take levels one by one; use --granularity block.")
    folder = root / f"{executor.loaded.name}-{fingerprint({**key, 'v': DB_VERSION})}"
    built = []
    for i, level in enumerate(levels):
        interrupt.checkpoint()
        started = time.perf_counter()
        lv, how = _level(executor, level, folder)
        built.append(lv)
        if on_level:
            on_level(i + 1, len(levels), str(level), f"{how} in {time.perf_counter() - started:.1f} s")
    executor.restore()
    db = LevelDB(built, units_of(executor.model, granularity, embeddings), executor, depth, folder)
    db.keep_in_memory_if_it_fits()
    return db


def level_folder(folder: Path, level: pl.Pipeline) -> Path:
    return folder / f"level-{fingerprint([str(level), method_versions([level])])}"


def _level(executor, level: pl.Pipeline, folder: Path) -> tuple[Level, str]:
    target = level_folder(folder, level)
    found = _read_level(level, target)
    if found is not None:
        return found, "read from disk"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f".{target.name}.lock")):  # another worker building it: wait, then read it
        found = _read_level(level, target)
        if found is not None:
            return found, "read from disk (built by another process)"
        for stale in folder.glob(f".{target.name}.*"):  # a builder killed mid-write (we hold its lock now)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        _build_level(executor, level, target)
    return _read_level(level, target, checked=True), "built"


def _build_level(executor, level: pl.Pipeline, target: Path) -> None:
    """Apply the level uniformly, then write every block parameter, and the weights outside the blocks that it
    changed, with their bytes and the files' checksums."""
    from safetensors.torch import save_file

    model, baseline = executor.model, executor.reference.baseline_bits
    prefix = blocks_prefix(model) + "."
    executor.restore()
    outside = {n: t.detach().clone() for n, _, _, t in parameters(model) if not n.startswith(prefix)}
    compressed = executor.compress(level)
    inside = [(n, m, p) for n, m, p, _ in parameters(model) if n.startswith(prefix)]
    items, tensors = _pack_params(inside, baseline)
    changed = [(n, m, p) for n, m, p, t in parameters(model)
               if n in outside and (entry(m, p) != Entry() or not torch.equal(t, outside[n]))]
    rest_items, rest_tensors = _pack_params(changed, baseline)
    manifest = {"level": str(level), "versions": method_versions([level]),
                "ratio": compressed.footprint.compression_ratio, "compress_seconds": compressed.seconds,
                "sparsity": compressed.footprint.sparsity, "params": items, "rest": rest_items}

    def fill(folder: Path) -> None:
        save_file(tensors, str(folder / "units.safetensors"))
        save_file(rest_tensors, str(folder / "rest.safetensors"))
        manifest["files"] = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
                             for name in ("units.safetensors", "rest.safetensors")}
        (folder / "level.json").write_text(json.dumps(manifest))

    atomic_folder(target, fill, replace=True)


_CHECKED: set[Path] = set()  # level folders whose checksums this process has verified


def _read_level(level: pl.Pipeline, folder: Path, checked: bool = False) -> Level | None:
    """The level stored in `folder`, or None when it is missing or damaged (then it is rebuilt): every file
    must have the bytes and, once per process, the sha256 its manifest records."""
    try:
        manifest = json.loads((folder / "level.json").read_text())
        files = manifest["files"]
        for name, want in files.items():
            if (folder / name).stat().st_size != want["bytes"]:
                raise ValueError(f"{name} has {(folder / name).stat().st_size} bytes, not {want['bytes']}")
        if not checked and folder not in _CHECKED:
            for name, want in files.items():
                if _sha256(folder / name) != want["sha256"]:
                    raise ValueError(f"{name} does not match its checksum")
        _CHECKED.add(folder)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the stored level %s in %s is damaged (%s); it is built again", level, folder, exc)
        return None
    return Level(level, folder, manifest, manifest["ratio"])


# ---- the database --------------------------------------------------------------------------------------------


class LevelDB:
    """The units of a dynamic study, each with its options (levels, drop, embedding options)."""

    def __init__(self, levels: list[Level], units: list[Unit], executor, depth: bool, folder: Path):
        self.levels = sorted(levels, key=lambda lv: (lv.ratio, str(lv.pipeline)))
        self.units, self.depth, self.folder = units, depth, folder
        self.baseline_bits = executor.reference.baseline_bits
        self._model, self._device = executor.model, executor.loaded.device  # pristine when read (see module)
        self._pristine = {p: _skeleton(executor.model.get_submodule(p)) for u in units for p in u.paths}
        self._memory: dict[tuple[int, int], tuple[nn.Module, ...]] = {}
        self._extra = {u: self._extra_options(unit) for u, unit in enumerate(units)}
        self.options = [self._options(u, unit) for u, unit in enumerate(units)]
        self._rest()

    # -- options

    @property
    def labels(self) -> list[str]:
        """The levels' pipeline texts, least compressing first."""
        return [str(lv.pipeline) for lv in self.levels]

    def _unit_params(self, unit: Unit) -> list[str]:
        return [f"{p}.{n}" for p in unit.paths for n, _ in self._pristine[p].named_parameters()]

    def _options(self, u: int, unit: Unit) -> list[Option]:
        if unit.kind == "embedding":
            return [opt for opt, _ in self._extra[u]]
        names = self._unit_params(unit)
        linear = self._linear_weight_names(unit)
        dense = self._linear_weights(unit)
        out = []
        for lv in self.levels:
            items = {n: lv.params[n] for n in names}
            kept = sum(_numel(items[n]["spec"]["shape"]) for n in linear)
            out.append(Option(str(lv.pipeline), sum(it["bytes"] for it in items.values()),
                              sum(it["ledger"]["pruned"] for it in items.values()), dense - kept))
        return out + [opt for opt, _ in self._extra[u]]

    def _linear_weight_names(self, unit: Unit) -> list[str]:
        return [f"{p}.{n}.weight" if n else f"{p}.weight" for p in unit.paths
                for n, m in self._pristine[p].named_modules() if isinstance(m, nn.Linear)]

    def _linear_weights(self, unit: Unit) -> int:
        return sum(m.weight.numel() for p in unit.paths for m in self._pristine[p].modules() if isinstance(m, nn.Linear))

    def _extra_options(self, unit: Unit) -> list[tuple[Option, Callable[[], tuple[nn.Module, ...]]]]:
        """Options that no level build makes: drop (depth pruning) and an embedding unit's own options."""
        if unit.kind == "embedding":
            return embedding_options(self, unit)
        if not self.depth or unit.kind == "linear":
            return []
        return [(Option(DROP, 0, 0, self._linear_weights(unit)), lambda unit=unit: _dropped(unit, self._pristine))]

    def option_labels(self, u: int) -> list[str]:
        return [o.label for o in self.options[u]]

    # -- sizes

    def bytes_of(self, profile: Profile) -> int:
        return self.rest_bytes + sum(self.options[u][i].bytes for u, i in enumerate(profile.levels))

    def footprint(self, profile: Profile, reference: Reference) -> Footprint:
        """Exact, from the stored per-unit bytes: what `measure` gives on the assembled model."""
        total = self.bytes_of(profile)
        removed = sum(self.options[u][i].removed + self.options[u][i].pruned for u, i in enumerate(profile.levels))
        return Footprint(total, 1.0 - total / reference.dense_bytes, 8 * total / reference.n_weights,
                         removed / reference.n_block_linear_weights)

    def uniform(self, feasible: Callable[[Profile], bool]) -> Profile | None:
        """Every block unit at the least compressing level that is feasible (embedding units at their least
        compressing option that then meets the target, else their most compressing); None: none is."""
        for i in range(len(self.levels)):
            levels = [i if unit.kind != "embedding" else 0 for unit in self.units]
            for u, unit in enumerate(self.units):
                while unit.kind == "embedding" and not feasible(Profile(tuple(levels))) and \
                        levels[u] < len(self.options[u]) - 1:
                    levels[u] += 1
            if feasible(Profile(tuple(levels))):
                return Profile(tuple(levels))
        return None

    def describe(self, profile: Profile) -> str:
        counts: dict[str, int] = {}
        for u, i in enumerate(profile.levels):
            label = self.options[u][i].label
            counts[label] = counts.get(label, 0) + 1
        kinds = sorted({unit.kind for unit in self.units})
        return f"dynamic ({len(self.units)} units: {'/'.join(kinds)}): " + ", ".join(
            f"{n}x {label}" for label, n in counts.items())

    # -- modules

    def modules(self, u: int, i: int) -> tuple[nn.Module, ...]:
        """The unit's modules at option i, on the model's device (from memory, else read from disk)."""
        if (u, i) in self._memory:
            return self._memory[(u, i)]
        unit = self.units[u]
        if i >= len(self.levels) or unit.kind == "embedding":
            k = i - (0 if unit.kind == "embedding" else len(self.levels))
            return self._extra[u][k][1]()
        return self._load(self.levels[i], unit)

    def _load(self, lv: Level, unit: Unit) -> tuple[nn.Module, ...]:
        """The unit as the level stored it, built on copies of its pristine modules."""
        tensors = lv.tensors()
        out = []
        for path in unit.paths:
            module = copy.deepcopy(self._pristine[path])
            items = {n[len(path) + 1:]: it for n, it in lv.params.items() if n.startswith(path + ".")}
            packed.resize_linears(module, {local: tuple(it["spec"]["shape"]) for local, it in items.items()})
            for local, item in items.items():
                value, e = _unpack_param(f"{path}.{local}", item, tensors)
                owner_name, _, pname = local.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                held = owner._parameters[pname].dtype  # the model's dtype, whatever type stored the values
                owner._parameters[pname] = nn.Parameter(value.to(self._device, held), requires_grad=False)
                record(owner, pname, qparams=e.qparams, pruned=e.pruned, act_quant=e.act_quant, grid=e.grid,
                       **vars(e.format))
                if e.act_quant in packed.ACTIVATION_HOOKS:  # ggml's rounding: Assembly.apply (a tied head needs it)
                    owner.register_forward_pre_hook(packed.ACTIVATION_HOOKS[e.act_quant])
            out.append(module.to(self._device))
        return tuple(out)

    def _rest(self) -> None:
        """The weights outside every unit, from the level that compresses most; their bytes."""
        top = max(self.levels, key=lambda lv: lv.ratio)
        self.rest_from = str(top.pipeline)
        covered = {n for unit in self.units for n in self._unit_params(unit)}
        tensors = _Tensors(top.folder / "rest.safetensors")
        self.rest = {}
        for name, item in {**top.manifest["rest"], **top.params}.items():
            if name in covered:
                continue
            source = tensors if name in top.manifest["rest"] else top.tensors()
            self.rest[name] = _unpack_param(name, item, source)
        self.rest_bytes = sum(stored_bytes(value, e, self.baseline_bits) for value, e in self.rest.values())
        untouched = [(n, m, p, t) for n, m, p, t in parameters(self._model) if n not in self.rest and n not in covered]
        self.rest_bytes += sum(stored_bytes(t, entry(m, p), self.baseline_bits) for _, m, p, t in untouched)

    def keep_in_memory_if_it_fits(self) -> None:
        """Every level's units in memory on the model's device when they fit in half the free memory; otherwise
        each assembly reads the units it swaps from disk."""
        per_level = sum(p.numel() * p.element_size() for u in self.units if u.kind != "embedding"
                        for path in u.paths for p in self._pristine[path].parameters())
        need = per_level * len(self.levels)
        if need > _available_bytes(self._device) // 2:
            log.info("the level database (%.1f GiB) does not fit in memory; units are read from disk as they are "
                     "swapped in", need / 2**30)
            return
        started = time.perf_counter()
        for i, lv in enumerate(self.levels):
            interrupt.checkpoint()  # once per level read: seconds each for a large model
            for u, unit in enumerate(self.units):
                if unit.kind != "embedding":
                    self._memory[(u, i)] = self._load(lv, unit)
        log.info("level database in memory: %d levels of %d units (%.2f GiB) in %.1f s", len(self.levels),
                 len(self.units), need / 2**30, time.perf_counter() - started)

    @property
    def in_memory(self) -> bool:
        return bool(self._memory)


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of a module whose parameters take no memory (on the meta device): what a stored unit is loaded
    into. Buffers stay real."""
    out = copy.deepcopy(module)
    for sub in out.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                     requires_grad=False)
    return out


def _numel(shape) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


def _dropped(unit: Unit, pristine: dict) -> tuple[nn.Module, ...]:
    """The modules that remove a unit: the identity for a block, zero output for a sub-block (and the identity
    for the norm only it reads)."""
    if unit.kind == "block":
        return (packed.IdentityBlock(),)
    zero = packed.ZeroAttention() if unit.kind == "attn" else packed.ZeroMLP()
    return zero, nn.Identity()


# ---- an embedding unit's options -----------------------------------------------------------------------------


def _gguf_params(db: "LevelDB") -> list:
    """The parameters of the levels' gguf steps (none when the levels are not GGUF types)."""
    return [s.params for lv in db.levels for s in lv.pipeline.steps if s.method == "gguf"]


def _gguf_activations(db: "LevelDB") -> str:
    """"ggml" when a GGUF level evaluates its inputs rounded as llama.cpp's CPU kernels round them, else "float"."""
    return "ggml" if any(p.activations == "ggml" for p in _gguf_params(db)) else "float"


def option_methods(label: str) -> list[str]:
    """The method names an option label stands for (export's refusals read them): a level's steps, [DROP], or an
    embedding unit's own option ("embed: int8 per row", as embedding_options names them): fp16, rtn or gguf."""
    if label == DROP:
        return [DROP]
    if ": " in label:
        kind = label.split(": ", 1)[1]
        return ["fp16" if kind == "fp16" else "rtn" if kind.startswith("int") else "gguf"]
    return [s.method for s in pl.parse(label).steps]


def embedding_options(db: "LevelDB", unit: Unit) -> list[tuple[Option, Callable[[], tuple[nn.Module, ...]]]]:
    """The token embedding's (or an untied head's) options, least compressing first: GGUF types when the levels
    are GGUF types (Q8_0, Q6_K and theirs), else FP16, 8-bit per row and 4-bit per group of 64 (round-to-
    nearest). Built now, from the pristine model, and kept in host memory."""
    from compactmind.methods._gguf import store_
    from compactmind.methods._quant import rtn_quantize, write_quantized_

    source = db._model.get_submodule(unit.path)
    cols = source.weight.shape[1]

    def made(apply) -> nn.Module:
        m = copy.deepcopy(source).cpu()
        with torch.no_grad():
            apply(m)
        return m

    def rtn(bits: int, group: int):
        group = group if group and cols % group == 0 else 0
        return lambda m: write_quantized_(m, rtn_quantize(m.weight.float(), bits, group, False), bits, group, False)

    types = sorted({p.type for p in _gguf_params(db)})
    if types:  # each by the type it is stored in (a width a K-quant cannot hold takes llama.cpp's fallback)
        from compactmind.llamacpp import fitting

        stored = sorted({fitting(t, cols) for t in ("Q8_0", "Q6_K", *types)} - {"F16"})
        act = _gguf_activations(db)
        choices = {t: (lambda m, t=t: store_(m, "weight", t, activations=act)) for t in stored}
    else:
        from compactmind.formats import narrow_to

        def fp16(m):
            m.weight.data.copy_(m.weight.data.half().to(m.weight.dtype))
            narrow_to(m, "weight", torch.float16)

        choices = {"fp16": fp16, "int8 per row": rtn(8, 0), "int4 g64": rtn(4, 64)}
    built = [(label, made(apply)) for label, apply in choices.items()]
    out = [(Option(f"{unit.name}: {label}", stored_bytes(m.weight, entry(m, "weight"), db.baseline_bits)),
            lambda m=m: (m,)) for label, m in built]
    return sorted(out, key=lambda item: -item[0].bytes)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---- assembly -------------------------------------------------------------------------------------------------


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


class Assembly:
    """The model's current profile, and the one way to change it: swap in the units whose option changed (a
    trial that moves k of N units copies only those k). The weights outside the units are set once."""

    def __init__(self, db: LevelDB, model: nn.Module):
        self.db, self.model = db, model
        self.current: list[int | None] = [None] * len(db.units)
        self.swapped = 0  # units swapped in so far (what a test counts)
        self._rest_set = False
        self._ggml_inputs = _gguf_activations(db) == "ggml"  # inputs rounded as llama.cpp's CPU kernels do

    def reset(self) -> None:
        """The model was restored to its pristine state: nothing of a profile is in it any more."""
        self.current = [None] * len(self.db.units)
        self._rest_set = False

    def apply(self, profile: Profile) -> int:
        """Make the model this profile; returns the number of units swapped."""
        if not self._rest_set:
            self._set_rest()
        changed = [u for u, i in enumerate(profile.levels) if self.current[u] != i]
        for u in changed:
            unit = self.db.units[u]
            modules = self.db.modules(u, profile.levels[u])
            if unit.kind == "embedding":
                _copy_embedding(self.model, unit.path, modules[0])
            else:
                for path, module in zip(unit.paths, modules):
                    _set_submodule(self.model, path, module)
            self.current[u] = profile.levels[u]
        if self._ggml_inputs and changed:  # swapped-in linears, and a tied head, get ggml's rounding (once each)
            from compactmind.methods._gguf import round_inputs_

            round_inputs_(self.model)
        self.swapped += len(changed)
        return len(changed)

    def _set_rest(self) -> None:
        for name, (value, e) in self.db.rest.items():
            module_name, _, pname = name.rpartition(".")
            module = self.model.get_submodule(module_name) if module_name else self.model
            getattr(module, pname).data.copy_(value.to(getattr(module, pname).device))
            record(module, pname, qparams=e.qparams, pruned=e.pruned, act_quant=e.act_quant, grid=e.grid,
                   **vars(e.format))
        self._rest_set = True


def _copy_embedding(model: nn.Module, path: str, source: nn.Module) -> None:
    """An embedding option is written into the model's own module (its weight may be tied to the head)."""
    target = model.get_submodule(path)
    target.weight.data.copy_(source.weight.data.to(target.weight.device))
    e = entry(source, "weight")
    record(target, "weight", qparams=e.qparams, pruned=e.pruned, act_quant=e.act_quant, grid=e.grid,
           **vars(e.format))
