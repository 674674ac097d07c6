"""Dynamic compression: a compression level per unit (a decoder block, or each linear layer in it), assembled
from a database of pre-compressed units.

EvoPress (Sieberling, Kuznedelev, Kurtic, Alistarh, "EvoPress: Accurate Dynamic Model Compression via
Evolutionary Search", ICML 2025) builds such a database once: each level is applied uniformly to the whole model
with the normal layer-by-layer calibration loop, and every unit's compressed weights are kept. A trial then
assembles a profile, one level per unit, by swapping those units into the pristine model: it compresses nothing,
and its size is exact from the stored per-unit bytes before any evaluation.

Levels are the study's candidate pipelines, indexed by the compression ratio of their uniform application (0
compresses least). Weights outside the units (embeddings, head and final norm; with linear granularity also the
blocks' norms) take one setting for the whole study: those of the level that compresses most (quantization keeps
them in FP16, pruning leaves them as they are); the study records which.

Each level is kept on disk in the packed format (packed.py) in a folder keyed by fingerprints of the model, the
calibration data, the protocol and the level, so a resume or a second worker reads it back instead of rebuilding
it; in memory (on the model's device) when every level fits in half the free memory, else read from disk per
assembly. OWL (Yin et al., "Outlier Weighed Layerwise Sparsity", ICML 2024) gives a heuristic allocation that
every dynamic study measures as a baseline: units with more outlier weights (|W|·||X|| above M = 5 times the
layer's mean) get one level less compression, those with fewer one level more (OWL's λ = 0.08 at a level step of
0.1 sparsity is about one level), repaired to meet the target exactly.
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
from compactmind.packing import pack_tensor
from compactmind.formats import Entry, QuantParams, Sparsity, TensorFormat, entry, record, stored_bytes
from compactmind.models import block_linears, blocks_prefix, decoder_layers
from compactmind.registry import get_method

log = logging.getLogger(__name__)

DB_VERSION = 1
OUTLIER_M = 5.0  # OWL's outlier threshold: M times the layer's mean score


@dataclass(frozen=True)
class Unit:
    name: str  # the trial parameter: "block.3", or "block.3.mlp.down_proj"
    path: str  # the module's qualified name in the model
    block: int


def units_of(model: nn.Module, granularity: str) -> list[Unit]:
    layers, prefix = decoder_layers(model), blocks_prefix(model)
    if granularity == "block":
        return [Unit(f"block.{i}", f"{prefix}.{i}", i) for i in range(len(layers))]
    units = []
    for path, _ in block_linears(model):
        block, _, sub = path[len(prefix) + 1:].partition(".")
        units.append(Unit(f"block.{block}.{sub}", path, int(block)))
    return units


@dataclass(frozen=True)
class Profile:
    """One level index per unit."""

    levels: tuple[int, ...]

    def describe(self, labels: list[str], unit: str) -> str:
        counts = {i: self.levels.count(i) for i in sorted(set(self.levels))}
        return f"dynamic ({len(self.levels)} {unit}s): " + ", ".join(f"{n}x {labels[i]}" for i, n in counts.items())


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def _fingerprint(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---- a level's units on disk: packed tensors plus each weight's ledger entry -----------------------------------


def _ledger_json(e: Entry) -> dict:
    f = e.format
    return {"bits": f.bits, "scaled": f.scaled, "group_size": f.group_size, "zero_point": f.zero_point,
            "sparsity": f.sparsity.value, "n": f.n, "m": f.m, "cast": f.cast, "ggml": f.ggml, "pruned": e.pruned}


def _entry_from(ledger: dict, spec: dict, name: str, tensors) -> Entry:
    fmt = TensorFormat(bits=ledger["bits"], scaled=ledger["scaled"], group_size=ledger["group_size"],
                       zero_point=ledger["zero_point"], sparsity=Sparsity(ledger["sparsity"]), n=ledger["n"],
                       m=ledger["m"], cast=ledger.get("cast"), ggml=ledger.get("ggml"))
    if fmt.ggml:
        return Entry(fmt, None, ledger["pruned"], False)
    qparams = None
    if fmt.scaled:
        scale = tensors(f"{name}.scale")
        zero = (packed.unpack_bits(tensors(f"{name}.zero"), fmt.bits, scale.numel()).view(scale.shape)
                if fmt.zero_point else torch.full(scale.shape, 2 ** (fmt.bits - 1), dtype=torch.uint8))
        groups = tensors(f"{name}.group_index").long() if f"{name}.group_index" in tensors.names else None
        qparams = QuantParams(scale, zero, groups)
    return Entry(fmt, qparams, ledger["pruned"], spec.get("act_quant") == "per_token_int8")


class _Tensors:
    """Lazy access to the tensors of a safetensors file."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), "pt")
        self.names = set(self._file.keys())

    def __call__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one packed weight (packed.py names them NAME and NAME.<part>)."""
        wanted = [name] + [f"{name}.{part}" for part in ("values", "codes", "scale", "zero", "mask", "group_index",
                                                           "ggml")]
        return {n: self(n) for n in wanted if n in self.names}


def _pack_params(named, baseline_bits: int) -> tuple[dict, dict]:
    """(manifest, stored tensors) of (name, module, parameter name) triples, with their ledger entries."""
    manifest, tensors = {}, {}
    for name, module, pname in named:
        spec, out = pack_tensor(name, module, pname, baseline_bits)
        manifest[name] = {"spec": spec, "ledger": _ledger_json(entry(module, pname))}
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


@dataclass
class _Level:
    pipeline: pl.Pipeline
    folder: Path
    ratio: float  # of its uniform application
    unit_bytes: list[int]
    unit_pruned: list[int]  # weights a pruning mask zeroed, per unit
    unit_removed: list[int]  # block-linear weights structured pruning cut out, per unit
    manifest: dict
    modules: list[nn.Module] | None = None  # in memory, when the levels fit


class LevelDB:
    """The levels of a dynamic study, each unit compressed once and kept (see the module docstring)."""

    def __init__(self, levels: list[_Level], units: list[Unit], rest: dict, rest_bytes: int, rest_from: str,
                 model: nn.Module, device: torch.device):
        self.levels = sorted(levels, key=lambda lv: (lv.ratio, str(lv.pipeline)))
        self.units, self.rest, self.rest_bytes, self.rest_from = units, rest, rest_bytes, rest_from
        self._model, self._device = model, device  # the live model: a unit is read into a copy of its pristine one

    @property
    def labels(self) -> list[str]:
        return [str(lv.pipeline) for lv in self.levels]

    def bytes_of(self, profile: Profile) -> int:
        return self.rest_bytes + sum(self.levels[lv].unit_bytes[u] for u, lv in enumerate(profile.levels))

    def footprint(self, profile: Profile, reference: Reference) -> Footprint:
        """Exact, from the stored per-unit bytes: what `measure` gives on the assembled model."""
        total = self.bytes_of(profile)
        removed = sum(self.levels[lv].unit_removed[u] + self.levels[lv].unit_pruned[u]
                      for u, lv in enumerate(profile.levels))
        return Footprint(total, 1.0 - total / reference.dense_bytes, 8 * total / reference.n_weights,
                         removed / reference.n_block_linear_weights)

    def uniform(self, feasible: Callable[[Profile], bool]) -> Profile | None:
        """Every unit at the least compressing level that is feasible (None: none is)."""
        for i in range(len(self.levels)):
            profile = Profile((i,) * len(self.units))
            if feasible(profile):
                return profile
        return None

    def assemble_(self, model: nn.Module, profile: Profile) -> None:
        """Swap each unit's chosen level into `model` (which must be pristine) and set the rest."""
        for name, (value, e) in self.rest.items():
            module_name, _, pname = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            getattr(module, pname).data.copy_(value.to(getattr(module, pname).device))
            record(module, pname, qparams=e.qparams, pruned=e.pruned, act_quant=e.act_quant, **vars(e.format))
        for u, (unit, lv) in enumerate(zip(self.units, profile.levels)):
            _set_submodule(model, unit.path, self._unit(lv, u))

    def _unit(self, level: int, u: int) -> nn.Module:
        lv = self.levels[level]
        if lv.modules is not None:
            return lv.modules[u]
        return self._load_unit(lv, u)

    def _load_unit(self, lv: _Level, u: int, tensors: _Tensors | None = None) -> nn.Module:
        """The unit as the level stored it, built on a copy of the model's module at its path (still the pristine
        one: units are read before they are swapped in)."""
        unit = self.units[u]
        tensors = tensors or _Tensors(lv.folder / "units.safetensors")
        module = copy.deepcopy(self._model.get_submodule(unit.path))
        items = {n[len(unit.path) + 1:]: item for n, item in lv.manifest["units"][unit.name]["params"].items()}
        packed.resize_linears(module, {local: tuple(item["spec"]["shape"]) for local, item in items.items()})
        for local, item in items.items():
            value, e = _unpack_param(f"{unit.path}.{local}", item, tensors)
            owner_name, _, pname = local.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            getattr(owner, pname).data = value.to(self._device)
            record(owner, pname, qparams=e.qparams, pruned=e.pruned, act_quant=e.act_quant, **vars(e.format))
            if e.act_quant:
                owner.register_forward_pre_hook(packed.per_token_int8)
        return module.to(self._device)


# ---- building or reading the database -----------------------------------------------------------------------


def open_db(executor, levels: list[pl.Pipeline], granularity: str, root: Path, key: dict,
            on_level: Callable[[int, int, str, str], None] | None = None) -> LevelDB:
    """The level database of these levels: each level read from `root` when a run built it before, else built
    now (applied uniformly through `executor`) and written there. `key` identifies model, data and protocol."""
    model = executor.model
    if granularity == "linear":
        for level in levels:
            for step in level.steps:
                if not get_method(step.method).separable:
                    raise ConfigError(f"{step.method} changes weights outside each linear layer (norms or shapes), "
                                      "so its linears cannot take levels one by one; use --granularity block.")
    units = units_of(model, granularity)
    folder = root / f"{executor.loaded.name}-{_fingerprint({**key, 'granularity': granularity, 'v': DB_VERSION})}"
    built = []
    for i, level in enumerate(levels):
        interrupt.checkpoint()
        started = time.perf_counter()
        lv, how = _level(executor, level, units, folder)
        built.append(lv)
        if on_level:
            on_level(i + 1, len(levels), str(level), f"{how} in {time.perf_counter() - started:.1f} s")
    executor.restore()
    db = _with_rest(built, units, executor)
    _keep_in_memory(db, executor.model)
    return db


def _level(executor, level: pl.Pipeline, units: list[Unit], folder: Path) -> tuple[_Level, str]:
    target = folder / f"level-{_fingerprint(str(level))}"
    if (target / "level.json").is_file():
        return _read_level(level, target, units), "read from disk"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f".{target.name}.lock")):  # another worker building it: wait, then read it
        if (target / "level.json").is_file():
            return _read_level(level, target, units), "read from disk (built by another process)"
        for stale in folder.glob(f".{target.name}.*"):  # a builder killed mid-write (we hold its lock now)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        _build_level(executor, level, units, target)
    return _read_level(level, target, units), "built"


def _build_level(executor, level: pl.Pipeline, units: list[Unit], target: Path) -> None:
    """Apply the level uniformly, then write its units, and the weights outside them that it changed."""
    from safetensors.torch import save_file

    model, baseline = executor.model, executor.reference.baseline_bits
    unit_paths = {u.path for u in units}
    executor.restore()
    outside = {n: t.detach().clone() for n, _, _, t in parameters(model)
               if not any(n.startswith(u + ".") for u in unit_paths)}
    compressed = executor.compress(level)
    manifest = {"level": str(level), "ratio": compressed.footprint.compression_ratio,
                "compress_seconds": compressed.seconds, "units": {}, "rest": {}}
    tensors = {}
    for unit in units:
        named = [(f"{unit.path}.{n}", m, p) for n, m, p, _ in parameters(model.get_submodule(unit.path))]
        items, out = _pack_params(named, baseline)
        weights = [(m, p) for _, m, p in named if isinstance(m, nn.Linear) and p == "weight"]
        manifest["units"][unit.name] = {
            "params": items, "bytes": sum(stored_bytes(getattr(m, p), entry(m, p), baseline) for _, m, p in named),
            "pruned": sum(entry(m, p).pruned for m, p in weights),
            "weights": sum(getattr(m, p).numel() for m, p in weights)}
        tensors.update(out)
    changed = [(n, m, p) for n, m, p, t in parameters(model)
               if n in outside and (entry(m, p) != Entry() or not torch.equal(t, outside[n]))]
    items, rest_tensors = _pack_params(changed, baseline)
    manifest["rest"] = items
    def fill(folder: Path) -> None:
        save_file(tensors, str(folder / "units.safetensors"))
        save_file(rest_tensors, str(folder / "rest.safetensors"))
        (folder / "level.json").write_text(json.dumps(manifest))

    atomic_folder(target, fill, replace=True)


def _read_level(level: pl.Pipeline, folder: Path, units: list[Unit]) -> _Level:
    manifest = json.loads((folder / "level.json").read_text())
    stats = [manifest["units"][u.name] for u in units]
    return _Level(level, folder, manifest["ratio"], [s["bytes"] for s in stats], [s["pruned"] for s in stats],
                  [0] * len(units), manifest)


def _with_rest(levels: list[_Level], units: list[Unit], executor) -> LevelDB:
    """The weights outside the units come from the level that compresses most; the removed block-linear weights
    of each unit are counted against the pristine model (the executor's, restored)."""
    baseline, model = executor.reference.baseline_bits, executor.model
    dense_weights = [sum(m.weight.numel() for m in _linears(model.get_submodule(u.path))) for u in units]
    for lv in levels:
        lv.unit_removed = [dense - lv.manifest["units"][u.name]["weights"] for u, dense in zip(units, dense_weights)]
    top = max(levels, key=lambda lv: lv.ratio)
    tensors = _Tensors(top.folder / "rest.safetensors")
    rest = {name: _unpack_param(name, item, tensors) for name, item in top.manifest["rest"].items()}
    rest_bytes = sum(stored_bytes(value, e, baseline) for value, e in rest.values())
    untouched = [(n, m, p, t) for n, m, p, t in parameters(model) if n not in rest
                 and not any(n.startswith(u.path + ".") for u in units)]
    rest_bytes += sum(stored_bytes(t, entry(m, p), baseline) for _, m, p, t in untouched)
    return LevelDB(levels, units, rest, rest_bytes, str(top.pipeline), model, executor.loaded.device)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


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


def _keep_in_memory(db: LevelDB, model: nn.Module) -> None:
    """Every level's units in memory on the model's device when they fit in half the free memory; otherwise
    each assembly reads its units from disk."""
    per_level = sum(p.numel() * p.element_size() for u in db.units for p in model.get_submodule(u.path).parameters())
    need = per_level * len(db.levels)
    if need > _available_bytes(db._device) // 2:
        log.info("the level database (%.1f GiB) does not fit in memory; units are read from disk per trial",
                 need / 2**30)
        return
    for lv in db.levels:
        tensors = _Tensors(lv.folder / "units.safetensors")
        lv.modules = [db._load_unit(lv, u, tensors) for u in range(len(db.units))]


# ---- OWL-style allocation --------------------------------------------------------------------------------------


@torch.inference_mode()
def outlier_ratios(model: nn.Module, samples: torch.Tensor, units: list[Unit], m: float = OUTLIER_M) -> list[float]:
    """Per unit, the share of its weights whose |W_ij|·||X_j|| exceeds m times its layer's mean (OWL's layerwise
    outlier distribution), on the dense model's calibration activations."""
    from compactmind.calibration import InputNorms, run_body

    linears = dict(block_linears(model))
    norms = {name: InputNorms(lin) for name, lin in linears.items()}
    handles = [lin.register_forward_hook(lambda mod, a, o, acc=norms[name]: acc.add_batch(a[0], o))
               for name, lin in linears.items()]
    try:
        run_body(model, samples)
    finally:
        for h in handles:
            h.remove()
    out = []
    for unit in units:
        members = [n for n in linears if n == unit.path or n.startswith(unit.path + ".")]
        outliers = total = 0
        for name in members:
            score = linears[name].weight.abs().float() * norms[name].sq.sqrt().unsqueeze(0)
            outliers += int((score > m * score.mean()).sum())
            total += score.numel()
        out.append(outliers / total)
    return out


def owl_profile(db: LevelDB, scores: list[float], feasible: Callable[[Profile], bool]) -> Profile | None:
    """One level less compression for the units with the most outliers, one more for those with the fewest,
    around the uniform level; then repaired to be feasible, and to spend what is left of the budget."""
    uniform = db.uniform(feasible)
    if uniform is None:
        return None
    s = torch.tensor(scores, dtype=torch.float64)
    spread = (s - s.mean()).abs().max()
    z = (s - s.mean()) / spread if spread > 0 else torch.zeros_like(s)
    top = len(db.levels) - 1
    levels = [min(top, max(0, round(u - float(zi)))) for u, zi in zip(uniform.levels, z)]
    order = sorted(range(len(levels)), key=lambda i: scores[i])  # fewest outliers first
    while not feasible(Profile(tuple(levels))):  # over budget: compress the least sensitive more
        i = next((i for i in order if levels[i] < top), None)
        if i is None:
            return None
        levels[i] += 1
    for i in reversed(order):  # budget left: give the most sensitive less compression while it stays feasible
        while levels[i] > 0 and feasible(Profile(tuple(levels[:i] + [levels[i] - 1] + levels[i + 1:]))):
            levels[i] -= 1
    return Profile(tuple(levels))
