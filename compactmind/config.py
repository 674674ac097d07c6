"""The settings of a study run (`RunConfig`), validated here and only here, and the objectives it can optimise.

A `RunConfig` has one field per command-line flag (same names, `no_hybrids` and `no_early_stop` included), so a
study file's [run] table, the command line and the copy a study stores are the same dictionary: `to_dict()`
writes it, `from_dict()` reads it back and validates every value's type and range.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compactmind.errors import ConfigError
from compactmind.objectives import OBJECTIVES, QUALITY

DEFAULT_STORAGE = "sqlite:///storage/compactmind.db"
STORAGE_ENV = "COMPACTMIND_STORAGE"  # a storage URL (with its password) kept out of the command line and `ps`


def default_storage() -> str:
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE

FITNESS = tuple(QUALITY)
GRANULARITIES = ("block", "sublayer", "linear")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Fields that belong to one process, not to the study: a worker or a resumed run brings its own.
LOCAL_FIELDS = ("gpu", "cpu", "offload", "storage", "study_name", "output_dir", "n_trials", "timeout")


@dataclass(frozen=True)
class RunConfig:
    model_path: str | None = None
    data_path: str | None = None
    calib_path: str | None = None
    target_ratio: float = 0.5
    target_bpw: float | None = None  # instead of target_ratio: bits per weight over every weight (a file size)
    dtype: str = "auto"
    seq_len: int | None = None  # None: min(2048, the model's context)
    max_eval_windows: int | None = None
    data_samples: int = 10
    batch_size: int = 1
    strategy: str | None = None  # None: grid for a static study, evopress for a dynamic one
    methods: tuple[str, ...] | None = None
    grids: dict | None = None  # {method: {param: [values]}} from a study file
    no_hybrids: bool = False
    seed: int = 0
    ppl_cap_factor: float = 10.0
    dominance_margin: float | None = None  # stop a candidate running this many times worse than a better one's
    # (None: 2 for a static study; 1 for a dynamic one, EvoPress's multi-step selection)
    no_early_stop: bool = False
    baseline_bits: int = 32
    objectives: tuple[str, ...] | None = None  # None: the quality objective and compression_ratio
    dynamic: bool = False  # a compression level per unit, assembled from a database of pre-compressed units
    granularity: str = "block"  # a dynamic study's unit: a decoder block, a sub-block (attention, MLP), a linear
    fitness: str = "ppl"  # a dynamic study's selection score: perplexity or KL divergence to the dense model
    selection_windows: int = 32  # windows of the calibration text a dynamic study selects on
    depth: bool = False  # dynamic: a unit may be dropped (a block, or an attention or MLP sub-block)
    embedding_units: bool = False  # dynamic: the token embedding (and an untied head) take options of their own
    offspring: int | None = None  # evopress: children per generation (None: scaled to the number of units)
    stages: str | None = None  # evopress: selection stages before the final one, "1x8,4x2" (windows x survivors)
    random_profiles: int | None = None  # dynamic: random profiles measured as a baseline (None: 8 where no
    # uniform level hits the target, else 0)
    levels_dir: str | None = None  # where a dynamic study's level database lives (default: beside the storage)
    gpu: bool = False
    cpu: bool = False
    offload: bool = False  # decoder blocks in host memory, each on the device only while it is in use
    storage: str = dataclasses.field(default_factory=default_storage)
    study_name: str | None = None
    output_dir: str | None = None
    n_trials: int | None = None  # budget for non-exhaustive strategies (None: until --timeout, or 100 without one)
    timeout: float | None = None  # seconds

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _TYPES[f.name])
        if self.target_bpw is not None:
            object.__setattr__(self, "target_ratio", 1.0 - self.target_bpw / self.baseline_bits)
        if self.strategy is None:
            object.__setattr__(self, "strategy", "evopress" if self.dynamic else "grid")
        if self.objectives is None:
            object.__setattr__(self, "objectives", (self.quality, "compression_ratio"))
        if self.dominance_margin is None:
            object.__setattr__(self, "dominance_margin", 1.0 if self.dynamic else 2.0)
        for name in ("model_path", "data_path", "calib_path"):  # a study is joined from other folders too
            value = getattr(self, name)
            if value and Path(value).expanduser().exists():
                object.__setattr__(self, name, str(Path(value).expanduser().resolve()))
        self._check_ranges()

    def _check_ranges(self) -> None:
        from compactmind.study.sampler import STRATEGIES

        rules = [
            (0.0 <= self.target_ratio < 1.0, f"--target_ratio must be a number from 0 up to (not including) 1, got "
                                             f"{self.target_ratio}." if self.target_bpw is None else
                                             f"--target_bpw must be above 0 and at most {self.baseline_bits} (the "
                                             f"baseline precision), got {self.target_bpw}."),
            (self.strategy in STRATEGIES, f"Unknown strategy {self.strategy!r}; choose one of: "
                                          f"{', '.join(STRATEGIES)}."),
            (self.dtype in DTYPES, f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}."),
            (self.data_samples >= 1, f"--data_samples must be at least 1, got {self.data_samples}."),
            (self.seq_len is None or self.seq_len >= 2, f"--seq_len must be at least 2, got {self.seq_len}."),
            (self.max_eval_windows is None or self.max_eval_windows >= 1,
             f"--max_eval_windows must be at least 1, got {self.max_eval_windows}."),
            (self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}."),
            (self.ppl_cap_factor > 1.0, f"--ppl_cap_factor must be a number above 1, got {self.ppl_cap_factor}."),
            (self.dominance_margin >= 1.0 and math.isfinite(self.dominance_margin),
             f"--dominance_margin must be a finite number of at least 1, got {self.dominance_margin}."),
            (self.n_trials is None or self.n_trials >= 1, f"--n_trials must be at least 1, got {self.n_trials}."),
            (self.timeout is None or self.timeout > 0,
             f"--timeout must be a positive number of seconds, got {self.timeout}."),
            (self.baseline_bits in (16, 32), f"--baseline_bits must be 32 or 16, got {self.baseline_bits}."),
            (not (self.gpu and self.cpu), "--gpu and --cpu exclude each other; pass one of them, or neither for "
                                          "automatic."),
            (self.methods is None or len(self.methods) > 0, "No candidate pipelines: --methods names no method; "
                                                            "pass at least one."),
            (self.methods is None or len(set(self.methods)) == len(self.methods),
             f"--methods names a method twice ({', '.join(self.methods or ())}); name each once."),
            (self.study_name is None or 0 < len(self.study_name) <= 200 and self.study_name.isprintable(),
             "--study_name must be 1 to 200 printable characters."),
            (self.granularity in GRANULARITIES, f"--granularity must be one of {', '.join(GRANULARITIES)}."),
            (self.fitness in FITNESS, f"--fitness must be one of {', '.join(FITNESS)}."),
            (self.selection_windows >= 2, f"--selection_windows must be at least 2, got {self.selection_windows}."),
            (self.offspring is None or self.offspring >= 2, f"--offspring must be at least 2, got {self.offspring}."),
            (self.random_profiles is None or self.random_profiles >= 0,
             f"--random_profiles must be 0 or more, got {self.random_profiles}."),
            (not (self.offload and self.dynamic), "--offload runs static studies (a dynamic study swaps whole units "
                                                  "on the device); drop one of them."),
            (self.dynamic or not (self.depth or self.embedding_units), "--depth and --embedding_units shape a "
                                                                        "dynamic study's units; add --dynamic."),
        ]
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"--objectives {','.join(self.objectives)} is not a list of distinct objectives from: "
                              f"{', '.join(OBJECTIVES)}.")
        if not {self.quality, "compression_ratio"} <= set(self.objectives):
            raise ConfigError(f"--objectives must include {self.quality} and compression_ratio (the target ratio and "
                              "the best configuration are defined on them).")
        if self.dynamic and STRATEGIES[self.strategy].exhaustive:
            raise ConfigError(f"A dynamic study has a level per unit, far too many profiles for --strategy "
                              f"{self.strategy}; use evopress, tpe, nsga2, random, qmc or gp.")
        if not self.dynamic and STRATEGIES[self.strategy].levels_only:
            raise ConfigError(f"--strategy {self.strategy} searches a level per unit; add --dynamic.")

    @property
    def quality(self) -> str:
        """The objective `best` minimises: test perplexity, or a dynamic study's selection fitness."""
        return QUALITY[self.fitness] if self.dynamic else "perplexity"

    @property
    def hybrids(self) -> bool:
        return not self.no_hybrids

    @property
    def early_stop(self) -> bool:
        return not self.no_early_stop

    def to_dict(self, study_only: bool = False) -> dict[str, Any]:
        """Plain values (lists for tuples); study_only leaves out what belongs to one process."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if not (study_only and f.name in LOCAL_FIELDS)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "the settings") -> "RunConfig":
        return cls(**cls.normalized(values, where))

    @classmethod
    def normalized(cls, values: dict[str, Any], where: str = "the settings") -> dict[str, Any]:
        """`values` with known names only and each of its type (lists of names as tuples): what a study file is
        checked for on its own; the rules between settings are checked once, on the merged settings."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where} set unknown options {', '.join(unknown)}; see 'compactmind run --help' for "
                              "the flag names.")
        values = dict(values)
        for key in ("methods", "objectives"):
            if isinstance(values.get(key), str):
                values[key] = tuple(m.strip() for m in values[key].split(",") if m.strip())
            elif isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        for key, value in values.items():
            _check_type(key, value, _TYPES[key])
        return values

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


_TYPES = typing.get_type_hints(RunConfig)


def _check_type(name: str, value: Any, hint) -> None:
    """One sentence when a value (from a flag, a study file or a stored study) has the wrong type."""
    if _matches(value, hint):
        return
    shown = {int: "an integer", float: "a number", bool: "true or false", str: "a text"}
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    want = " or ".join(shown.get(typing.get_origin(k) or k, "a list of names" if typing.get_origin(k) is tuple
                                 else "a table") for k in kinds)
    raise ConfigError(f"The setting {name} must be {want}, got {value!r}.")


def _matches(value: Any, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return False


def load_study_file(path: str) -> tuple[dict, dict]:
    """Read a study TOML file: its [run] table (flag names and values) and its [grids.METHOD] tables."""
    import tomllib

    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"The study file {p} does not exist; pass a path such as studies/demo.toml.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The study file {p} cannot be read: {exc}.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"The study file {p} is not valid TOML: {exc}.") from exc
    unknown = set(doc) - {"run", "grids", "description"}
    if unknown:
        raise ConfigError(f"The study file {p} has unknown tables {', '.join(sorted(unknown))}; "
                          "use [run] and [grids.METHOD].")
    run, grids = doc.get("run", {}), doc.get("grids", {})
    if not isinstance(run, dict) or not isinstance(grids, dict):
        raise ConfigError(f"In {p}, [run] and [grids] must be tables.")
    if not all(isinstance(v, dict) and all(isinstance(x, list) for x in v.values()) for v in grids.values()):
        raise ConfigError(f"In {p}, each [grids.METHOD] table must map parameter names to lists of values.")
    return dict(run), grids
