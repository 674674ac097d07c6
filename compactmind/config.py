"""The settings of a study run, validated once, at the edge."""

from __future__ import annotations

import math
from dataclasses import dataclass

from compactmind.errors import ConfigError

STRATEGIES = ("grid", "tpe", "nsga2", "random", "qmc", "gp", "bruteforce")
DEFAULT_STORAGE = "sqlite:///storage/compactmind.db"


@dataclass(frozen=True)
class RunConfig:
    model_path: str | None = None
    data_path: str | None = None
    calib_path: str | None = None
    target_ratio: float = 0.5
    gpu: bool = False
    cpu: bool = False
    dtype: str = "auto"
    seq_len: int | None = None  # None: min(2048, the model's context)
    max_eval_windows: int | None = None
    data_samples: int = 10
    batch_size: int = 1
    strategy: str = "grid"
    methods: tuple[str, ...] | None = None
    grids: dict | None = None  # {method: {param: [values]}} from a study file
    hybrids: bool = True
    storage: str = DEFAULT_STORAGE
    study_name: str | None = None
    output_dir: str | None = None
    seed: int = 0
    ppl_cap_factor: float = 10.0
    dominance_margin: float = 2.0  # stop a candidate whose running ppl is this many times a dominating trial's
    early_stop: bool = True
    n_trials: int | None = None  # budget for non-grid strategies (None: until --timeout, or 100 without one)
    timeout: float | None = None  # seconds
    baseline_bits: float = 32.0

    def __post_init__(self):
        if not (isinstance(self.target_ratio, (int, float)) and 0.0 <= self.target_ratio < 1.0):
            raise ConfigError(f"--target_ratio must be a number from 0 up to (not including) 1, got {self.target_ratio}.")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"Unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}.")
        if self.data_samples < 1:
            raise ConfigError(f"--data_samples must be at least 1, got {self.data_samples}.")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"--seq_len must be at least 2, got {self.seq_len}.")
        if self.max_eval_windows is not None and self.max_eval_windows < 1:
            raise ConfigError(f"--max_eval_windows must be at least 1, got {self.max_eval_windows}.")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be at least 1, got {self.batch_size}.")
        if not (self.ppl_cap_factor > 1.0 and math.isfinite(self.ppl_cap_factor)) and self.ppl_cap_factor != math.inf:
            raise ConfigError(f"--ppl_cap_factor must be above 1, got {self.ppl_cap_factor}.")
        if self.dominance_margin < 1.0:
            raise ConfigError(f"--dominance_margin must be at least 1, got {self.dominance_margin}.")
        if self.n_trials is not None and self.n_trials < 1:
            raise ConfigError(f"--n_trials must be at least 1, got {self.n_trials}.")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout}.")
        if self.baseline_bits not in (16.0, 32.0):
            raise ConfigError(f"--baseline_bits must be 32 or 16, got {self.baseline_bits}.")
        if self.gpu and self.cpu:
            raise ConfigError("--gpu and --cpu exclude each other; pass one of them, or neither for automatic.")


def load_study_file(path: str) -> tuple[dict, dict]:
    """Read a study TOML file: its [run] table (flag names and values) and its [grids.METHOD] tables."""
    import tomllib
    from pathlib import Path

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
    grids = doc.get("grids", {})
    if not all(isinstance(v, dict) and all(isinstance(x, list) for x in v.values()) for v in grids.values()):
        raise ConfigError(f"In {p}, each [grids.METHOD] table must map parameter names to lists of values.")
    return dict(doc.get("run", {})), grids
