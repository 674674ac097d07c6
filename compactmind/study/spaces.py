"""What a study searches, and what each candidate is scored on.

`PipelineSpace`: one pipeline per trial (a method, or an ordered pruning/quantization hybrid); Optuna parameters
`pipeline`, then `method.param` per step; the trial compresses the model and is scored on the test windows.

`LevelSpace` (a dynamic study): one level per unit; Optuna parameters `block.0`, `block.1`, ... (the level index,
levels ordered by ratio), so the dashboard shows each trial's profile and samplers see an ordered space; the
trial assembles the profile from the level database and is scored on selection windows of validation text
(perplexity, or KL divergence to the dense model), never on the test windows. The chosen trials are measured
on the test windows at the end (session.finalize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import optuna
import torch

from compactmind import pipeline as pl
from compactmind.dynamic import LevelDB, Profile
from compactmind.evaluate import kl_divergence, running_mean, window_logprobs
from compactmind.registry import get_method
from compactmind.space import Categorical, Int
from compactmind.executor import Compressed, Executor


def _suggest(trial: optuna.Trial, name: str, spec):
    if isinstance(spec, Categorical):
        return trial.suggest_categorical(name, spec.grid())
    if isinstance(spec, Int):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step)
    return trial.suggest_float(name, spec.low, spec.high, step=spec.step)


def suggest_pipeline(trial: optuna.Trial, shapes: list[str], spaces: dict[str, dict]) -> pl.Pipeline:
    """The structured space: which pipeline (shape), then each step's parameters."""
    shape = trial.suggest_categorical("pipeline", shapes)
    steps = []
    for name in shape.split(" -> "):
        values = {k: _suggest(trial, f"{name}.{k}", spec) for k, spec in spaces[name].items()}
        steps.append(pl.Step(name, get_method(name).Params(**values)))
    return pl.Pipeline(tuple(steps))


@dataclass
class PipelineSpace:
    candidates: list[pl.Pipeline]
    spaces: dict[str, dict]  # the effective search space of each method

    @cached_property
    def shapes(self) -> list[str]:
        return list(dict.fromkeys(c.shape for c in self.candidates))

    def suggest(self, trial: optuna.Trial) -> pl.Pipeline:
        return suggest_pipeline(trial, self.shapes, self.spaces)

    @staticmethod
    def describe(candidate: pl.Pipeline) -> dict:
        return {"candidate": str(candidate), "pipeline": str(candidate), "steps": candidate.to_json(),
                "hybrid": candidate.is_hybrid}

    @staticmethod
    def compress(executor: Executor, candidate: pl.Pipeline) -> Compressed:
        return executor.compress(candidate)


@dataclass
class LevelSpace:
    db: LevelDB
    unit: str  # "block" or "linear"
    target_ratio: float
    dense_bytes: int
    quality: str  # the objective a profile is chosen on

    @property
    def candidates(self) -> list:
        return []

    def feasible(self, profile: Profile | tuple[int, ...]) -> bool:
        """The profile meets the target ratio (the same formula as the footprint's ratio)."""
        levels = profile.levels if isinstance(profile, Profile) else tuple(profile)
        return 1.0 - self.db.bytes_of(Profile(levels)) / self.dense_bytes >= self.target_ratio

    def uniform(self) -> Profile | None:
        return self.db.uniform(self.feasible)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.db.units]

    def suggest(self, trial: optuna.Trial) -> Profile:
        top = len(self.db.levels) - 1
        return Profile(tuple(trial.suggest_int(name, 0, top) for name in self.names))

    def describe(self, profile: Profile) -> dict:
        return {"candidate": ",".join(map(str, profile.levels)),
                "pipeline": profile.describe(self.db.labels, self.unit),
                "profile": list(profile.levels), "hybrid": False}

    def compress(self, executor: Executor, profile: Profile) -> Compressed:
        return executor.assemble(self.db, profile)

    @staticmethod
    def profile_of(params: dict, names: list[str]) -> Profile:
        return Profile(tuple(int(params[n]) for n in names))


@dataclass(frozen=True)
class Scored:
    value: float  # the figure: perplexity, or mean KL divergence
    window_loss: tuple[float, ...]  # per-window sums (NLL or KL), in order
    windows: int
    tokens: int
    seconds: float
    stopped: str | None


class Scorer:
    """What trials are scored on: the quality objective, its windows, and its running value after k windows."""

    def __init__(self, objective: str, windows: torch.Tensor, prefix: str, dense: dict | None):
        self.objective, self.windows, self.prefix = objective, windows, prefix
        self.loss_attr = f"{prefix}window_nll" if objective.endswith("perplexity") else f"{prefix}window_kl"
        self.seq_len = windows.shape[1]
        nll = (dense or {}).get(self.loss_attr)
        self.dense_curve = self.curve(nll) if nll else None
        self.dense_value = (dense or {}).get(objective)
        self._reference = None

    @property
    def capped(self) -> bool:
        """The perplexity cap applies (a KL divergence has no dense reference value to scale)."""
        return self.objective.endswith("perplexity")

    def curve(self, window_loss) -> list[float]:
        means = running_mean(window_loss, self.seq_len)
        return [math.exp(min(m, 700.0)) for m in means] if self.capped else means

    def score(self, executor: Executor, batch_size: int, stop=None) -> Scored:
        if self.capped:
            r = executor.evaluate(batch_size, stop, windows=self.windows)
            return Scored(r.perplexity, r.window_nll, r.windows, r.tokens, r.seconds, r.stopped)
        r = kl_divergence(executor.model, self.windows, self.reference(executor), batch_size, stop,
                          executor.progress.window)
        return Scored(r.kl, r.window_kl, r.windows, r.tokens, r.seconds, r.stopped)

    def prepare(self, executor: Executor) -> None:
        """Before any trial, on the pristine model: the dense model's next-token log-probabilities on the windows
        (what KL is measured against), once per process."""
        if not self.capped and self._reference is None:
            executor.restore()
            device = next(executor.model.parameters()).device
            self._reference = torch.cat([window_logprobs(executor.model, w[None].to(device)) for w in self.windows])

    def reference(self, executor: Executor) -> torch.Tensor:
        if self._reference is None:
            raise RuntimeError("Scorer.prepare must run on the pristine model before the first KL score")
        return self._reference

    def attrs(self, result: Scored) -> dict:
        """The figures a trial records; a candidate stopped early records its value as partial_<objective>."""
        p = self.prefix
        name = f"partial_{self.objective}" if result.stopped else self.objective
        return {name: result.value, f"{p}eval_seconds": result.seconds, f"{p}windows": result.windows,
                f"{p}eval_tokens": result.tokens, self.loss_attr: [round(x, 4) for x in result.window_loss]}
