"""Typed records of a study, read back from the storage alone: what report, dashboard, `best`, `compare`,
`export` and the CLI summary all read. Objective values are read by name, never by position."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from compactmind.study.storage import safe_url

STUDY_ATTR = "compactmind"  # the study's own user attribute: identity, settings, dense baseline


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str  # Optuna's: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    values: dict[str, float]  # objective name -> value, for COMPLETE trials
    feasible: bool | None  # every constraint met (None: none recorded)
    params: dict[str, Any]
    attrs: dict[str, Any]  # every user attribute: pipeline, status, reason, figures, timings
    started: str | None = None
    finished: str | None = None
    duration_seconds: float | None = None
    retry_of: int | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """A figure by name: an objective value, else the attribute of that name."""
        if key in self.values:
            return self.values[key]
        return self.attrs.get(key, default)

    @property
    def status(self) -> str | None:
        return self.attrs.get("status")

    @property
    def pipeline(self) -> str | None:
        return self.attrs.get("pipeline")

    @property
    def perplexity(self) -> float | None:
        return self.get("perplexity")

    @property
    def compression_ratio(self) -> float | None:
        return self.get("compression_ratio")

    def to_dict(self) -> dict[str, Any]:
        """One flat row: the fixed fields, then the objective values, then every other attribute."""
        out = {"number": self.number, "state": self.state, "status": self.status, "pipeline": self.pipeline,
               "perplexity": self.perplexity, "compression_ratio": self.compression_ratio, **self.values,
               "feasible": self.feasible, "params": self.params, "started": self.started,
               "finished": self.finished, "duration_seconds": self.duration_seconds}
        if self.retry_of is not None:
            out["retry_of"] = self.retry_of
        for k, v in self.attrs.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def of(cls, t: FrozenTrial, objectives: list[str]) -> "TrialRecord":
        return cls(
            number=t.number, state=t.state.name,
            values=dict(zip(objectives, t.values)) if t.values else {},
            feasible=all(v <= 0 for v in t.constraints.values()) if t.constraints else None,
            params=dict(t.params), attrs=dict(t.user_attrs),
            started=t.datetime_start.isoformat() if t.datetime_start else None,
            finished=t.datetime_complete.isoformat() if t.datetime_complete else None,
            duration_seconds=t.duration.total_seconds() if t.duration else None,
            retry_of=t.system_attrs.get("failed_trial"))


@dataclass(frozen=True)
class StudyRecords:
    study: str
    storage: str  # the URL with any password masked
    objectives: dict[str, str]  # name -> direction, in the study's order
    target_ratio: float
    model: dict | None
    data: dict | None
    protocol: dict | None
    dense: dict | None
    trials: list[TrialRecord]
    best: TrialRecord | None  # the feasible trial with the lowest perplexity
    pareto_front: list[TrialRecord]  # over every objective, sorted by compression ratio
    counts: dict[str, int] = field(default_factory=dict)

    def trial(self, number: int) -> TrialRecord | None:
        return next((t for t in self.trials if t.number == number), None)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(trials=[t.to_dict() for t in self.trials], best=self.best.to_dict() if self.best else None,
                   pareto_front=[t.to_dict() for t in self.pareto_front])
        return out


def objectives_of(study: optuna.Study) -> list[str]:
    return list(study.metric_names or ["perplexity", "compression_ratio"])


def collect(study: optuna.Study, storage_url: str) -> StudyRecords:
    """Everything a report needs, from the storage alone."""
    meta = study.user_attrs.get(STUDY_ATTR, {})
    identity = meta.get("identity", {})
    names = objectives_of(study)
    frozen = study.get_trials(deepcopy=False)
    trials = [TrialRecord.of(t, names) for t in frozen]
    target = identity.get("target_ratio", 0.0)
    front = study.best_trials if any(t.state == TrialState.COMPLETE for t in frozen) else []
    pareto = sorted((TrialRecord.of(t, names) for t in front), key=lambda r: r.compression_ratio)
    feasible = [r for r in trials if r.state == "COMPLETE" and r.feasible is not False
                and r.compression_ratio >= target]
    return StudyRecords(
        study=study.study_name, storage=safe_url(storage_url),
        objectives={n: d.name.lower() for n, d in zip(names, study.directions)},
        target_ratio=target, model=identity.get("model"), data=identity.get("data"),
        protocol=identity.get("protocol"), dense=meta.get("dense"), trials=trials,
        best=min(feasible, key=lambda r: r.perplexity) if feasible else None, pareto_front=pareto,
        counts={s.name: sum(1 for r in trials if r.state == s.name) for s in TrialState})
