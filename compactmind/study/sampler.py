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

import optuna
from optuna.distributions import IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from compactmind import pipeline as pl
from compactmind.study.records import SPARE_ATTR, best_trial, holds_configuration, is_spare

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
    """EvoPress's (1+λ) evolutionary search over level profiles (Sieberling et al., ICML 2025) as an Optuna
    sampler whose only state is the study, so many workers can share one study: each offspring is a mutation of
    the best feasible profile found so far (the parent), which changes as soon as an offspring beats it.

    Mutation is the level switch: one unit one level more compressed, another unit of the same size one level
    less, so the total size stays put; 1 to `max_switches` switches per offspring. Where levels are not evenly
    spaced in bytes (2/3/4/8 bits), a profile over the budget gets more compression on random units until it
    meets it. A profile the study already holds (measured or being measured) is not proposed again. Multi-step
    selection is the objective's early stop: an offspring that falls behind its parent on the first selection
    windows is not scored on more.
    Before any trial has finished, the sampler proposes the uniform profile (the study enqueues uniform and OWL).
    """

    def __init__(self, space, seed: int, max_switches: int = 3):
        self.space, self.seed, self.max_switches = space, seed, max_switches
        db = space.db
        self.names = space.names
        self.top = len(db.levels) - 1
        self.size_class = [tuple(lv.unit_bytes[u] for lv in db.levels) for u in range(len(self.names))]

    def infer_relative_search_space(self, study, trial):
        return {name: IntDistribution(0, self.top) for name in self.names}

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        trials = study.get_trials(deepcopy=False)
        parent = self._parent(trials)
        if parent is None:
            return {}
        seen = {tuple(t.params.get(n) for n in self.names) for t in trials  # a yield or a kill: proposed again
                if t.state != TrialState.FAIL and not is_spare(t)}
        rng = random.Random(self.seed * 1_000_003 + trial.number)
        child = parent
        for _ in range(64):
            child = self.mutate(parent, rng)
            if child not in seen:
                break
        return dict(zip(self.names, child))

    def sample_independent(self, study, trial, param_name, param_distribution):
        uniform = self.space.uniform()
        return uniform.levels[self.names.index(param_name)] if uniform is not None else 0

    def _parent(self, trials: list[FrozenTrial]) -> tuple[int, ...] | None:
        best = best_trial([t for t in trials if all(n in t.params for n in self.names)], self.space.quality)
        return None if best is None else tuple(int(best.params[n]) for n in self.names)

    def mutate(self, parent: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
        levels = list(parent)
        units = range(len(levels))
        for _ in range(rng.randint(1, self.max_switches)):
            more = [u for u in units if levels[u] < self.top]
            if not more:
                break
            a = rng.choice(more)
            less = [u for u in units if u != a and levels[u] > 0 and self.size_class[u] == self.size_class[a]] \
                or [u for u in units if u != a and levels[u] > 0]
            if not less:
                break
            b = rng.choice(less)
            levels[a] += 1
            levels[b] -= 1
        while not self.space.feasible(tuple(levels)):
            more = [u for u in units if levels[u] < self.top]
            if not more:
                break
            levels[rng.choice(more)] += 1
        return tuple(levels)


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
