"""Samplers: the exact candidate grid, and the strategy table (the one place a strategy name is bound to a
sampler).

The grid is exact: `CandidateSampler` walks the candidate list in order (single methods, then hybrids) and
answers the define-by-run suggestions (`pipeline`, then `method.param` per step) from the candidate, so each
configuration runs once and the dashboard shows the real parameters. A killed trial is failed by the storage
heartbeat and retried with the same candidate. Several workers may pick the same next candidate at the same
moment: each writes its pick, then looks for another holder, and whoever sees one moves on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from compactmind import pipeline as pl

CANDIDATE_ATTR = "compactmind:candidate"
SPARE_ATTR = "compactmind:spare"  # a grid trial that found every candidate taken by other workers


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
        """The candidate this trial holds: done, running, queued, or failed by an error of its own. A trial
        killed or interrupted holds nothing: its retry (or the next run) does the candidate again."""
        if t.state == TrialState.FAIL and t.user_attrs.get("status") != "failed":
            return None
        return self.label_of(t)

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


@dataclass(frozen=True)
class Strategy:
    name: str
    make: Callable[[list[pl.Pipeline], int], BaseSampler]  # (candidates, seed) -> sampler
    exhaustive: bool = False  # it enumerates its space and stops when done; the others run to a budget


def _optuna(factory) -> Callable[[list[pl.Pipeline], int], BaseSampler]:
    return lambda _candidates, seed: factory(seed)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("grid", lambda candidates, _seed: CandidateSampler(candidates), exhaustive=True),
    Strategy("tpe", _optuna(lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                                     constant_liar=True))),
    Strategy("nsga2", _optuna(lambda seed: optuna.samplers.NSGAIISampler(seed=seed))),
    Strategy("random", _optuna(lambda seed: optuna.samplers.RandomSampler(seed=seed))),
    Strategy("qmc", _optuna(lambda seed: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False))),
    Strategy("gp", _optuna(lambda seed: optuna.samplers.GPSampler(seed=seed))),
    Strategy("bruteforce", _optuna(lambda seed: optuna.samplers.BruteForceSampler(seed=seed)), exhaustive=True),
]}
