"""Typed records of a study, read back from the storage alone: what report, dashboard, `best`, `compare`,
`export` and the CLI summary all read. Objective values are read by name, never by position."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from compactmind.objectives import OBJECTIVES, QUALITY_OBJECTIVES
from compactmind.study.storage import safe_url

class TrialStatus(str, enum.Enum):
    """compactmind's word for what happened to a trial (its `status` attribute)."""

    OK = "ok"
    INFEASIBLE = "infeasible"  # below the target ratio: not evaluated
    INVALID = "invalid"  # the pipeline cannot apply to this model
    EARLY_STOPPED = "early_stopped"
    OVER_CAP = "over_cap"  # evaluated in full, perplexity over the cap: measured, infeasible
    NONFINITE = "nonfinite"
    FAILED = "failed"  # an error inside the trial (a bug in one method)
    OUT_OF_MEMORY = "out_of_memory"
    INTERRUPTED = "interrupted"  # Ctrl-C: run again when the study resumes
    TERMINATED = "terminated"  # SIGTERM (Slurm, Kubernetes, systemd): run again when the study resumes
    KILLED = "killed"  # its process died without a word (kill -9, a lost machine): failed by the heartbeat
    STAGE = "stage"  # an EvoPress selection stage: scored on a draw of windows, the best go on to the next
    SPARE = "spare"  # a grid trial that found every candidate taken by other workers


FAILED_OF_ITSELF = (TrialStatus.FAILED.value, TrialStatus.OUT_OF_MEMORY.value)  # running it again fails again


def holds_configuration(state: TrialState, status: str | None) -> bool:
    """Whether a trial has its configuration done (or in hand): any trial but a failed one, unless it failed of
    itself; a killed, interrupted or terminated one holds nothing, and its configuration runs again."""
    return state != TrialState.FAIL or status in FAILED_OF_ITSELF


# ---- the rules every reader of a study shares, each decided here once -----------------------------------------

BASELINE_ATTR = "baseline"  # a dynamic study's reference profile ("uniform", "owl", ...): measured in full, reported
SPARE_ATTR = "compactmind:spare"  # system attribute of a grid trial that found every candidate taken elsewhere


def baseline_of(t: FrozenTrial) -> str | None:
    return t.user_attrs.get(BASELINE_ATTR)


def is_spare(t: FrozenTrial) -> bool:
    return bool(t.system_attrs.get(SPARE_ATTR)) or t.user_attrs.get("status") == TrialStatus.SPARE.value


def is_feasible(constraints: dict[str, float]) -> bool:
    """Every recorded constraint met (<= 0, Optuna's convention): ratio >= target, quality within its cap."""
    return all(v <= 0 for v in constraints.values())


def better(quality: str) -> Callable[[float, float], bool]:
    """better(a, b): whether quality value a beats b, by the objective's direction (objectives.OBJECTIVES)."""
    return (lambda a, b: a > b) if OBJECTIVES[quality] == "maximize" else (lambda a, b: a < b)


def best_trial(trials, quality: str) -> FrozenTrial | None:
    """The study's best: the COMPLETE, feasible trial (not a copy of another) with the best quality objective;
    the earliest such trial on a tie."""
    beats = better(quality)
    best = None
    for t in trials:
        value = t.user_attrs.get(quality)
        if t.state == TrialState.COMPLETE and value is not None and is_feasible(t.constraints) \
                and "duplicate_of" not in t.user_attrs and (best is None or beats(value, best.user_attrs[quality])):
            best = t
    return best


# What a study records about itself, one user attribute per part, each written once by the step that owns it
# (so no part is ever read, changed and written back while another process writes another part):
META_PARTS = ("identity", "about", "config", "dense", "dynamic")
LEGACY_ATTR = "compactmind"  # studies of compactmind 0.1 kept every part in this one attribute
TEST_ATTR = "compactmind:test:"  # + trial number: a dynamic study's test figures of a chosen trial


def meta_attr(part: str) -> str:
    """The user attribute holding one part of a study's own record."""
    if part not in META_PARTS:
        raise KeyError(part)
    return f"compactmind:{part}"


def study_meta(user_attrs: dict) -> dict:
    """A study's own record: identity, about (paths and labels), config, dense baseline, and a dynamic study's
    levels (levels, level_ratios, level_seconds, units, options, rest_from) at the top level."""
    meta = dict(user_attrs.get(LEGACY_ATTR) or {})
    for part in META_PARTS:
        value = user_attrs.get(meta_attr(part))
        if value is None:
            continue
        if part == "dynamic":
            meta.update(value)
        else:
            meta[part] = value
    return meta


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
    def baseline(self) -> str | None:
        """A dynamic study's reference profile this trial measured ("uniform", "owl", ...), or None."""
        return self.attrs.get(BASELINE_ATTR)

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
    def of(cls, t: FrozenTrial, objectives: list[str], extra: dict | None = None) -> "TrialRecord":
        """extra: figures kept outside the trial (a dynamic study's test figures, the ratio against the source)."""
        return cls(
            number=t.number, state=t.state.name,
            values=dict(zip(objectives, t.values)) if t.values else {},
            feasible=is_feasible(t.constraints) if t.constraints else None,
            params=dict(t.params), attrs={**_killed(t), **t.user_attrs, **(extra or {})},
            started=t.datetime_start.isoformat() if t.datetime_start else None,
            finished=t.datetime_complete.isoformat() if t.datetime_complete else None,
            duration_seconds=t.duration.total_seconds() if t.duration else None,
            retry_of=t.system_attrs.get("failed_trial"))


def _killed(t: FrozenTrial) -> dict:
    """A failed trial that recorded no status: its process died without a word, and the heartbeat failed it."""
    if t.state == TrialState.FAIL and "status" not in t.user_attrs:
        return {"status": TrialStatus.KILLED.value, "reason": "its process stopped without recording why (kill -9, a lost machine); "
                                              "the storage heartbeat failed it and the study retries it"}
    return {}


@dataclass(frozen=True)
class StudyRecords:
    study: str
    storage: str  # the URL with any password masked
    objectives: dict[str, str]  # name -> direction, in the study's order
    quality: str  # the objective `best` minimises: perplexity, or a dynamic study's selection fitness
    target_ratio: float
    model: dict | None
    data: dict | None
    protocol: dict | None
    dense: dict | None
    trials: list[TrialRecord]
    best: TrialRecord | None  # the feasible trial with the best quality objective (best_trial)
    pareto_front: list[TrialRecord]  # over every objective, sorted by compression ratio
    counts: dict[str, int] = field(default_factory=dict)
    dynamic: dict | None = None  # levels, units and the rest setting of a dynamic study

    @property
    def statuses(self) -> str:
        """'20 ok, 8 infeasible, 5 early_stopped ...': what happened to the trials, in compactmind's words."""
        counts: dict[str, int] = {}
        for t in self.trials:
            key = t.status or t.state.lower()
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def source_note(self) -> str | None:
        """For a model loaded from a quantized file: what it was, so no figure is read as from a dense model."""
        model = self.model or {}
        if not model.get("source_bytes"):
            return None
        dense32 = model["parameters"] * 4
        return (f"loaded from a {model['source_format']} file: {model['source_bits_per_weight']:.2f} bits/weight as "
                f"stored (ratio {1 - model['source_bytes'] / dense32:.4f} against FP32); ratios here are against "
                f"FP32 weights, ratio_vs_source against that file")

    def trial(self, number: int) -> TrialRecord | None:
        return next((t for t in self.trials if t.number == number), None)

    @property
    def selection_vs_test(self) -> list[dict]:
        """A dynamic study's trials measured on the test windows: their selection figures beside their test
        perplexity, and each against the uniform profile's (how far selection carries over to the test)."""
        if self.quality == "perplexity":
            return []
        measured = [t for t in self.trials if t.get("perplexity") is not None and t.get(self.quality) is not None]
        uniform = next((t for t in measured if t.baseline == "uniform"), None)
        rows = []
        for t in measured:
            row = {"number": t.number, "baseline": t.baseline, self.quality: t.get(self.quality),
                   "selection_perplexity": t.get("selection_perplexity"), "perplexity": t.get("perplexity"),
                   "best": self.best is not None and t.number == self.best.number}
            if uniform is not None:
                row["selection_vs_uniform"] = t.get(self.quality) / uniform.get(self.quality) \
                    if uniform.get(self.quality) else None
                row["test_vs_uniform"] = t.get("perplexity") / uniform.get("perplexity")
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(trials=[t.to_dict() for t in self.trials], best=self.best.to_dict() if self.best else None,
                   pareto_front=[t.to_dict() for t in self.pareto_front], selection_vs_test=self.selection_vs_test)
        return out


def objectives_of(study: optuna.Study) -> list[str]:
    return list(study.metric_names or ["perplexity", "compression_ratio"])


def quality_of(study: optuna.Study) -> str:
    return next(n for n in objectives_of(study) if n in QUALITY_OBJECTIVES)


def collect(study: optuna.Study, storage_url: str) -> StudyRecords:
    """Everything a report needs, from the storage alone."""
    meta = study_meta(study.user_attrs)
    identity = meta.get("identity", {})
    about = meta.get("about", identity)  # paths and labels, for a person; identity holds the content
    names, quality, attrs = objectives_of(study), quality_of(study), study.user_attrs
    frozen = study.get_trials(deepcopy=False)

    source_bytes = (identity.get("model") or {}).get("source_bytes")

    def record(t: FrozenTrial) -> TrialRecord:
        extra = dict(attrs.get(f"{TEST_ATTR}{t.number}") or {})
        if source_bytes and isinstance(t.user_attrs.get("model_bytes"), (int, float)):
            extra["ratio_vs_source"] = 1.0 - t.user_attrs["model_bytes"] / source_bytes
        return TrialRecord.of(t, names, extra)

    trials = [record(t) for t in frozen]
    target = identity.get("target_ratio", 0.0)
    best = best_trial(frozen, quality)
    front = study.best_trials if any(t.state == TrialState.COMPLETE for t in frozen) else []
    pareto = sorted((record(t) for t in front if "duplicate_of" not in t.user_attrs),
                    key=lambda r: r.compression_ratio)
    dynamic = {k: meta[k] for k in ("levels", "level_ratios", "level_seconds", "units", "options", "rest_from")
               if k in meta} or None
    return StudyRecords(
        study=study.study_name, storage=safe_url(storage_url),
        objectives={n: d.name.lower() for n, d in zip(names, study.directions)}, quality=quality,
        target_ratio=target, model=about.get("model"), data=about.get("data"),
        protocol=identity.get("protocol"), dense=meta.get("dense"), trials=trials,
        best=next(r for r in trials if r.number == best.number) if best is not None else None, pareto_front=pareto,
        counts={s.name: sum(1 for r in trials if r.state == s.name) for s in TrialState}, dynamic=dynamic)
