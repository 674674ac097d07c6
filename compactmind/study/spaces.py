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

import logging
import math
import random
import time
from dataclasses import dataclass
from functools import cached_property

import optuna
import torch

from compactmind import interrupt
from compactmind import pipeline as pl
from compactmind.dynamic import LevelDB, Profile
from compactmind.errors import ConfigError
from compactmind.evaluate import kl_divergence, running_mean, window_logprobs
from compactmind.registry import get_method
from compactmind.space import Categorical, Int
from compactmind.executor import Compressed, Executor

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Schedule:
    """EvoPress's multi-step selection (Sieberling et al., 2025): each generation's `offspring` are scored on a
    few selection windows, the best `survivors` of each stage go on to the next stage's larger draw of windows,
    and the last stage scores its survivors on every selection window, where they meet the parent (whose score
    there is known). `stages` lists (windows, survivors) before that final stage; each stage's windows are drawn
    afresh per generation (seeded), without repeats."""

    offspring: int
    stages: tuple[tuple[int, int], ...]
    pool: int  # the selection windows: the final stage's
    seed: int = 0

    @classmethod
    def of(cls, text: str | None, offspring: int | None, units: int, pool: int, seed: int) -> "Schedule":
        """From --stages ("1x8,4x2": 1 window keeps 8, then 4 windows keep 2) and --offspring; the defaults scale
        with the number of units: offspring = units / 4 within 8..32, stages 1 window (the best quarter go on) and
        an eighth of the pool (the best two go on to the final stage)."""
        n = offspring or max(8, min(32, units // 4))
        if text:
            try:
                stages = tuple((int(w), int(k)) for w, k in (part.strip().split("x") for part in text.split(",")))
            except ValueError:
                raise ConfigError(f"--stages {text!r} is not a list such as 1x8,4x2 (windows x survivors).") from None
        else:  # a child a window, then the best quarter on an eighth of the pool, then the best two on all of it
            stages = ((1, max(2, n // 4)),) + (((pool // 8, 2),) if pool // 8 > 1 and n // 4 > 2 else ())
        survivors = [k for _, k in stages]
        if any(w < 1 or w >= pool for w, _ in stages) or survivors != sorted(survivors, reverse=True) \
                or survivors[0] > n or survivors[-1] < 1:
            raise ConfigError(f"--stages must draw 1 to {pool - 1} windows per stage (fewer than the {pool} "
                              f"selection windows of the final stage) and keep fewer survivors at each stage, at "
                              f"most --offspring ({n}).")
        return cls(n, stages, pool, seed)

    @property
    def final(self) -> int:
        return len(self.stages)

    def need(self, stage: int) -> int:
        """How many trials a stage of a generation scores."""
        return self.offspring if stage == 0 else self.stages[stage - 1][1]

    def windows(self, generation: int, stage: int) -> tuple[int, ...] | None:
        """The selection windows a stage scores on (None: all of them, the final stage)."""
        if stage >= self.final:
            return None
        rng = random.Random(f"{self.seed}:{generation}:{stage}")
        return tuple(sorted(rng.sample(range(self.pool), self.stages[stage][0])))


EVO_ATTR = "compactmind:evo"  # system attribute of a search trial: {"generation": g, "stage": s}


@dataclass(frozen=True)
class Proposal:
    """A profile to score, and where it stands in the staged selection (generation None: a baseline or another
    sampler's proposal, scored on every selection window)."""

    profile: Profile
    generation: int | None = None
    stage: int | None = None
    windows: tuple[int, ...] | None = None  # a non-final stage's selection windows

    @property
    def final(self) -> bool:
        return self.windows is None


@dataclass
class LevelSpace:
    db: LevelDB
    granularity: str  # "block", "sublayer" or "linear"
    target_ratio: float
    dense_bytes: int
    quality: str  # the objective a profile is chosen on
    schedule: Schedule | None = None

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

    def suggest(self, trial: optuna.Trial) -> Proposal:
        profile = Profile(tuple(trial.suggest_int(name, 0, len(options) - 1)
                                for name, options in zip(self.names, self.db.options)))
        evo = trial.storage.get_trial_system_attrs(trial._trial_id).get(EVO_ATTR)
        if evo is None or self.schedule is None:
            return Proposal(profile)
        g, s = evo["generation"], evo["stage"]
        return Proposal(profile, g, s, self.schedule.windows(g, s))

    def describe(self, p: Proposal) -> dict:
        key = ",".join(map(str, p.profile.levels))
        staged = {} if p.generation is None else {"evo_generation": p.generation, "evo_stage": p.stage}
        return {"candidate": key if p.final else f"{key}@g{p.generation}s{p.stage}",
                "pipeline": self.db.describe(p.profile), "profile": list(p.profile.levels), "hybrid": False,
                **staged}

    def compress(self, executor: Executor, p: Proposal) -> Compressed:
        return executor.assemble(self.db, p.profile)

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
    perplexity: float | None = None  # a KL score's perplexity on the same windows (the gap to the test figure)


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

    def score(self, executor: Executor, batch_size: int, stop=None, subset: tuple[int, ...] | None = None) -> Scored:
        """The quality on the windows (or the `subset` of them: a selection stage's draw)."""
        windows = self.windows if subset is None else self.windows[list(subset)]
        if self.capped:
            r = executor.evaluate(batch_size, stop, windows=windows)
            return Scored(r.perplexity, r.window_nll, r.windows, r.tokens, r.seconds, r.stopped)
        reference = self.reference(executor)
        reference = reference if subset is None else reference[list(subset)]
        r = kl_divergence(executor.model, windows, reference, batch_size, stop, executor.progress.window)
        return Scored(r.kl, r.window_kl, r.windows, r.tokens, r.seconds, r.stopped, r.perplexity)

    def prepare(self, executor: Executor) -> None:
        """Before any trial, on the pristine model: the dense model's next-token log-probabilities on the windows
        (what KL is measured against), once per process."""
        if not self.capped and self._reference is None:
            executor.restore()
            device = next(executor.model.parameters()).device
            started, rows = time.perf_counter(), []
            for w in self.windows:
                interrupt.checkpoint()  # once per window, as every evaluation
                rows.append(window_logprobs(executor.model, w[None].to(device)))
            self._reference = torch.cat(rows)
            log.info("dense reference for KL: %d windows in %.1f s", len(rows), time.perf_counter() - started)

    def reference(self, executor: Executor) -> torch.Tensor:
        if self._reference is None:
            raise RuntimeError("Scorer.prepare must run on the pristine model before the first KL score")
        return self._reference

    def attrs(self, result: Scored) -> dict:
        """The figures a trial records; a candidate stopped early records its value as partial_<objective>."""
        p = self.prefix
        name = f"partial_{self.objective}" if result.stopped else self.objective
        extra = {} if result.perplexity is None or result.stopped else {f"{p}perplexity": result.perplexity}
        return {name: result.value, f"{p}eval_seconds": result.seconds, f"{p}windows": result.windows,
                f"{p}eval_tokens": result.tokens, self.loss_attr: [round(x, 4) for x in result.window_loss], **extra}
