"""Samplers: the exact candidate grid, EvoPress's evolutionary search over level profiles, and the strategy
table (the one place a strategy name is bound to a sampler).

The grid is exact: `CandidateSampler` walks the candidate list in order (single methods, then hybrids) and
answers the define-by-run suggestions (`pipeline`, then `method.param` per step) from the candidate, so each
configuration runs once and the dashboard shows the real parameters. A killed trial is failed by the storage
heartbeat and retried with the same candidate. Several workers may pick the same next candidate at the same
moment: each writes its pick, then looks for another holder, and whoever sees one moves on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cmp_to_key

import optuna
from optuna.distributions import IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from compactmind import pipeline as pl
from compactmind.study.records import SPARE_ATTR, best_trial, better as better_of, holds_configuration, is_spare
from compactmind.study.spaces import EVO_ATTR

CANDIDATE_ATTR = "compactmind:candidate"


class CandidateSampler(BaseSampler):
    """Exact grid over a list of candidate pipelines: each runs once, in order, across restarts and workers."""

    def __init__(self, candidates: list[pl.Pipeline]):
        self.candidates = candidates
        self._by_label = {str(c): c for c in candidates}

    def label_of(self, trial: FrozenTrial) -> str | None:
        label = trial.system_attrs.get(CANDIDATE_ATTR)
        if label is None and "fixed_params" in trial.system_attrs:
            fixed = trial.system_attrs["fixed_params"]
            label = next((str(c) for c in self.candidates if c.flat_params() == fixed), None)
        return label

    def holder(self, t: FrozenTrial) -> str | None:
        """The candidate this trial holds: done, running, queued, or failed by an error of its own (re-running it
        would fail again). A trial killed, interrupted or terminated holds nothing: its retry (or the next run)
        does the candidate again."""
        return self.label_of(t) if holds_configuration(t.state, t.user_attrs.get("status")) else None

    def taken(self, study: optuna.Study, exclude: int | None = None) -> set[str]:
        return {label for t in study.get_trials(deepcopy=False)
                if t.number != exclude and (label := self.holder(t)) is not None}

    def remaining(self, study: optuna.Study, exclude: int | None = None) -> list[pl.Pipeline]:
        taken = self.taken(study, exclude)
        return [c for c in self.candidates if str(c) not in taken]

    def before_trial(self, study, trial):
        label = self.label_of(trial)
        if label is not None:
            if CANDIDATE_ATTR not in trial.system_attrs:
                study._storage.set_trial_system_attr(trial._trial_id, CANDIDATE_ATTR, label)
            return
        for _ in range(len(self.candidates)):
            todo = self.remaining(study, exclude=trial.number)
            if not todo:
                break
            pick = str(todo[0])
            study._storage.set_trial_system_attr(trial._trial_id, CANDIDATE_ATTR, pick)
            if not any(t.number != trial.number and self.holder(t) == pick
                       for t in study.get_trials(deepcopy=False)):
                return
        study._storage.set_trial_system_attr(trial._trial_id, CANDIDATE_ATTR, None)
        study._storage.set_trial_system_attr(trial._trial_id, SPARE_ATTR, True)

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        label = study._storage.get_trial_system_attrs(trial._trial_id)[CANDIDATE_ATTR]
        return self._by_label[label].flat_params()[param_name]

    def is_done(self, study: optuna.Study) -> bool:
        return not self.remaining(study)


class EvoPressSampler(BaseSampler):
    """EvoPress's (1+λ) evolutionary search over profiles (Sieberling et al., ICML 2025) as an Optuna sampler whose
    only state is the study, so many workers can share one study.

    Each generation mutates the best profile found so far (the parent: the best scored on every selection
    window, baselines included) into `offspring` children and selects among them in stages (spaces.Schedule):
    every child is scored on a small draw of selection windows, the best go on to larger draws, the last stage's
    survivors are scored on every selection window, where they meet the parent; a better one is the next
    generation's parent. Each scoring is one trial, which carries its generation and stage (spaces.EVO_ATTR).
    A worker that would wait for another's stage scores one more child of the current generation instead.

    Mutation is the level switch: one unit one option more compressed, another of the same size one less, so
    the total size stays put (1 to 3 switches, fewer more often: min of two draws, as EvoPress). A quarter of
    the switches (`ACROSS`) pair units of any size instead, so the search can trade between unit sizes
    (attention sub-blocks a third of an MLP's bytes, k/v projections a third of q's): the only way a depth
    profile changes how many attention and MLP sub-blocks it drops. Where the sizes differ (such a switch,
    embeddings, uneven levels), units are moved until the profile meets the target again and no further move
    fits. A profile the study already holds is not proposed again.
    Before the first parent is scored, the sampler proposes the uniform profile (the study enqueues its baselines).
    """

    ACROSS = 0.25  # the share of switches that pair units of any size

    def __init__(self, space, seed: int):
        self.space, self.seed = space, seed
        self.schedule = space.schedule
        self.names = space.names
        self.tops = [len(options) - 1 for options in space.db.options]
        self.size_class = [tuple(o.bytes for o in options) for options in space.db.options]

    def infer_relative_search_space(self, study, trial):
        return {name: IntDistribution(0, top) for name, top in zip(self.names, self.tops)}

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        trials = study.get_trials(deepcopy=False)
        plan = self.plan(trials, trial.number)
        if plan is None:
            return {}
        generation, stage, profile = plan
        study._storage.set_trial_system_attr(trial._trial_id, EVO_ATTR, {"generation": generation, "stage": stage})
        return dict(zip(self.names, profile))

    def sample_independent(self, study, trial, param_name, param_distribution):
        uniform = self.space.uniform()
        return uniform.levels[self.names.index(param_name)] if uniform is not None else 0

    def plan(self, trials: list[FrozenTrial], number: int) -> tuple[int, int, tuple[int, ...]] | None:
        """(generation, stage, profile) of the next trial; None before any parent is scored."""
        parent = self._parent(trials)
        if parent is None:
            return None
        staged = [t for t in trials if EVO_ATTR in t.system_attrs and t.number != number
                  and holds_configuration(t.state, t.user_attrs.get("status")) and not is_spare(t)]
        generation = max((t.system_attrs[EVO_ATTR]["generation"] for t in staged), default=0)
        ours = [t for t in staged if t.system_attrs[EVO_ATTR]["generation"] == generation]
        rng = random.Random(self.seed * 1_000_003 + number)
        for stage in range(self.schedule.final + 1):
            held = [t for t in ours if t.system_attrs[EVO_ATTR]["stage"] == stage]
            if len(held) >= self.schedule.need(stage):
                continue
            if stage == 0:
                return generation, 0, self._child(parent, trials, rng)
            promoted = self._promote(ours, stage, held)
            if promoted is not None:
                return generation, stage, promoted
            return generation, 0, self._child(parent, trials, rng)  # the stage before is still being scored
        return generation + 1, 0, self._child(self._parent(trials), trials, rng)

    def _promote(self, ours: list[FrozenTrial], stage: int, held: list[FrozenTrial]) -> tuple[int, ...] | None:
        """The best of the stage before (all of it scored) not yet taken on to this stage."""
        before = [t for t in ours if t.system_attrs[EVO_ATTR]["stage"] == stage - 1]
        if any(not t.state.is_finished() for t in before):
            return None
        quality = self.space.quality
        scored = [t for t in before if staged_value(t, quality) is not None]
        better = better_of(quality)
        ranked = sorted(scored, key=cmp_to_key(lambda a, b: -1 if better(staged_value(a, quality),
                                                                            staged_value(b, quality)) else 1))
        taken = {tuple(t.params.get(n) for n in self.names) for t in held}
        for t in ranked[: self.schedule.need(stage)]:
            profile = tuple(int(t.params[n]) for n in self.names)
            if profile not in taken:
                return profile
        return None

    def _parent(self, trials: list[FrozenTrial]) -> tuple[int, ...] | None:
        best = best_trial([t for t in trials if all(n in t.params for n in self.names)], self.space.quality)
        return None if best is None else tuple(int(best.params[n]) for n in self.names)

    def _child(self, parent: tuple[int, ...], trials: list[FrozenTrial], rng: random.Random) -> tuple[int, ...]:
        seen = {tuple(t.params.get(n) for n in self.names) for t in trials if t.state != TrialState.FAIL}
        child = parent
        for _ in range(64):
            child = self.mutate(parent, rng)
            if child not in seen:
                break
        return child

    def mutate(self, parent: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
        levels = list(parent)
        units = range(len(levels))
        for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
            more = [u for u in units if levels[u] < self.tops[u]]
            if not more:
                break
            a = rng.choice(more)
            less = [u for u in units if u != a and levels[u] > 0]
            same = [u for u in less if self.size_class[u] == self.size_class[a]]
            if same and (len(same) == len(less) or rng.random() >= self.ACROSS):  # a draw only where sizes differ
                less = same
            if not less:
                break
            b = rng.choice(less)
            levels[a] += 1
            levels[b] -= 1
        return self._repaired(levels, rng)

    def _repaired(self, levels: list[int], rng: random.Random) -> tuple[int, ...]:
        """Over the budget: compress random units more until it meets the target; then spend what is left on
        random units while the profile stays feasible (a few tries)."""
        units = range(len(levels))
        while not self.space.feasible(tuple(levels)):
            more = [u for u in units if levels[u] < self.tops[u]]
            if not more:
                break
            levels[rng.choice(more)] += 1
        for _ in range(8):
            less = [u for u in units if levels[u] > 0]
            if not less:
                break
            u = rng.choice(less)
            levels[u] -= 1
            if not self.space.feasible(tuple(levels)):
                levels[u] += 1
        return tuple(levels)


def staged_value(t: FrozenTrial, quality: str) -> float | None:
    """A trial's quality on the windows it was scored on: its objective value, or the figure a selection stage
    (or an early stop) recorded."""
    return t.user_attrs.get(quality, t.user_attrs.get(f"partial_{quality}"))


@dataclass(frozen=True)
class Strategy:
    name: str
    make: Callable[[object, int], BaseSampler]  # (the study's space, seed) -> sampler
    exhaustive: bool = False  # it enumerates its space and stops when done; the others run to a budget
    levels_only: bool = False  # it searches level profiles: dynamic studies only


def _optuna(factory) -> Callable[[object, int], BaseSampler]:
    return lambda _space, seed: factory(seed)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("grid", lambda space, _seed: CandidateSampler(space.candidates), exhaustive=True),
    Strategy("evopress", lambda space, seed: EvoPressSampler(space, seed), levels_only=True),
    Strategy("tpe", _optuna(lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                                     constant_liar=True))),
    Strategy("nsga2", _optuna(lambda seed: optuna.samplers.NSGAIISampler(seed=seed))),
    Strategy("random", _optuna(lambda seed: optuna.samplers.RandomSampler(seed=seed))),
    Strategy("qmc", _optuna(lambda seed: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False))),
    Strategy("gp", _optuna(lambda seed: optuna.samplers.GPSampler(seed=seed))),
    Strategy("bruteforce", _optuna(lambda seed: optuna.samplers.BruteForceSampler(seed=seed)), exhaustive=True),
]}
