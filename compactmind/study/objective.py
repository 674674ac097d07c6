"""The objective: one trial's life, from the sampler's proposal to the values the study records.

A trial restores the pristine model, applies the proposed pipeline (or assembles the proposed profile of a
dynamic study), and measures its footprint. Below the target ratio it is recorded as infeasible without an
evaluation. Otherwise its quality (test perplexity; a dynamic study's selection perplexity or KL divergence) is
measured window by window, and it stops early once its running value exceeds the cap (ppl_cap_factor x the dense
model's on the same windows) or, after a quarter of the windows (an eighth in a dynamic study), dominance_margin
x that of a finished feasible trial with at least its ratio on the same windows (Optuna's pruners refuse
two-objective studies, so early stopping lives here; for a dynamic study, with margin 1, it is EvoPress's
multi-step selection: an offspring that falls behind its parent on the first windows is not scored on more).
Every figure a person wants later goes into the trial's user attributes; the objective values are read from them
by name, in the order of the objectives.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from compactmind import interrupt
from compactmind.config import RunConfig
from compactmind.objectives import OBJECTIVES
from compactmind.errors import CompactMindError
from compactmind.study.records import BASELINE_ATTR, SPARE_ATTR, TrialStatus, is_feasible
from compactmind.study.storage import GRACE_S, StorageTrouble
from compactmind.study.spaces import LevelSpace, Scorer, PipelineSpace
from compactmind.executor import Compressed, Executor, peak_memory, reset_peak_memory

log = logging.getLogger(__name__)

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded with every trial: which process ran it
CONSTRAINTS = ("target_ratio", "perplexity_cap")  # ratio >= target; perplexity <= cap factor x dense


class TrialFailed(Exception):
    """A trial failed of its own (recorded with its reason); the study goes on. Any other error, a storage
    error above all, ends the run at once instead of failing every trial after it."""


class TrialLost(Exception):
    """Another worker failed this trial while it ran (no beat of it had reached the storage for the grace
    period); this worker drops it and goes on, and the configuration runs again."""


@dataclass
class TrialSetup:
    """Everything a trial needs, built once per study."""

    executor: Executor
    config: RunConfig
    space: PipelineSpace | LevelSpace
    measure: Scorer
    dense: dict  # the dense baseline as the study stores it


def set_constraint(trial: optuna.Trial, key: str, value: float) -> None:
    value = min(value, 1e30)  # a diverged model's infinite perplexity: violated, but a number
    attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    if f"constraints:{key}" in attrs:
        # A retry of a killed trial inherits its system attributes, and Optuna keeps the first constraint value.
        trial.storage.set_trial_system_attr(trial._trial_id, f"constraints:{key}", value)
    else:
        trial.set_constraint(key, value)
    # optuna-dashboard 0.21 reads only the older list attribute; write it too so infeasible trials show so.
    values = list(attrs.get("constraints") or [])
    values += [0.0] * (len(CONSTRAINTS) - len(values))
    values[CONSTRAINTS.index(key)] = value
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", values)


class Stopped(optuna.TrialPruned):
    """The trial ends without objective values; its status and reason are recorded."""


class TrialRun:
    """One trial: its attributes, written to the storage as they become known."""

    def __init__(self, ctx: TrialSetup, trial: optuna.Trial):
        self.ctx, self.trial, self.attrs = ctx, trial, {}

    def record(self, **values) -> None:
        for k, v in values.items():
            v = v.value if isinstance(v, TrialStatus) else v
            self.attrs[k] = v
            self.trial.set_user_attr(k, v)

    def stop(self, status: TrialStatus, reason: str) -> Stopped:
        self.record(status=status, reason=reason)
        return Stopped(reason)

    def values(self) -> tuple[float, ...]:
        return tuple(self.attrs[name] for name in self.ctx.config.objectives)

    def finish(self) -> None:
        self.ctx.executor.progress.trial_done({"number": self.trial.number, **self.attrs})


def record_signal(trial: optuna.Trial, stop: interrupt.Interrupted) -> None:
    """A signal ended this trial at one of its checkpoints: its status and reason, so it shows as interrupted
    or terminated, never as a silent failure."""
    try:
        trial.set_user_attr("status", stop.status)
        trial.set_user_attr("reason", f"{stop.status} by a signal; it runs again when the study resumes")
    except (optuna.exceptions.UpdateFinishedTrialError, *StorageTrouble):
        pass  # another worker failed it meanwhile, or the storage failed: the trial still ends FAIL


def lost(number: int) -> TrialLost:
    return TrialLost(f"trial {number} was failed by another worker while this one ran it (no beat of it "
                     f"reached the storage for {GRACE_S:.0f} s); this worker drops it, and its configuration runs "
                     "again")


def objective(ctx: TrialSetup, trial: optuna.Trial) -> tuple[float, ...]:
    try:
        return _objective(ctx, trial)
    except optuna.exceptions.UpdateFinishedTrialError:
        raise lost(trial.number) from None


def _objective(ctx: TrialSetup, trial: optuna.Trial) -> tuple[float, ...]:
    run = TrialRun(ctx, trial)
    if trial.storage.get_trial_system_attrs(trial._trial_id).get(SPARE_ATTR):
        raise run.stop(TrialStatus.SPARE, "every remaining candidate was taken by another worker")
    candidate = ctx.space.suggest(trial)
    described = ctx.space.describe(candidate)
    run.record(**described, worker=WORKER, dtype=str(ctx.executor.loaded.dtype).replace("torch.", ""),
               seq_len=ctx.executor.data.seq_len)
    twin = _twin_after_record(trial.study, described["candidate"], trial.number)
    if twin is not None and twin.state != TrialState.RUNNING:  # a sampler proposed a measured configuration
        return _replay(run, twin)
    if twin is not None:  # another worker took the same proposal a moment ago: it measures, this one yields
        stopped = run.stop(TrialStatus.SPARE, f"trial {twin.number} is measuring the same configuration")
        run.record(duplicate_of=twin.number)
        run.finish()
        raise stopped
    reset_peak_memory(ctx.executor.loaded.device)
    try:
        compressed = _compress(run, candidate)
        _check_ratio(run, compressed)
        values = _evaluate(run, compressed, candidate)
    except optuna.TrialPruned:
        run.finish()
        raise
    except (OSError, optuna.exceptions.UpdateFinishedTrialError, *StorageTrouble):
        raise  # the machine or the storage, not this candidate: end the run (or, lost, drop the trial)
    except Exception as exc:  # out of memory or a bug in one method: record it, free memory, go on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        oom = isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))
        run.record(status=TrialStatus.OUT_OF_MEMORY if oom else TrialStatus.FAILED,
                   reason=f"{type(exc).__name__}: {exc}"[:500])
        run.finish()
        raise TrialFailed(str(exc)) from exc
    run.finish()
    return values


def _compress(run: TrialRun, candidate) -> Compressed:
    try:
        compressed = run.ctx.space.compress(run.ctx.executor, candidate)
    except CompactMindError as exc:
        raise run.stop(TrialStatus.INVALID, str(exc)) from None
    fp = compressed.footprint
    run.record(compression_ratio=fp.compression_ratio, bits_per_weight=fp.bits_per_weight, sparsity=fp.sparsity,
               model_bytes=fp.model_bytes, compress_seconds=compressed.seconds)
    return compressed


def _check_ratio(run: TrialRun, compressed: Compressed) -> None:
    target, ratio = run.ctx.config.target_ratio, compressed.footprint.compression_ratio
    set_constraint(run.trial, "target_ratio", target - ratio)
    if ratio < target:
        set_constraint(run.trial, "perplexity_cap", 0.0)  # not measured: the ratio alone makes it infeasible
        run.record(windows=0, eval_tokens=0)
        raise run.stop(TrialStatus.INFEASIBLE, f"compression ratio {ratio:.4f} is below the target {target}")


def _evaluate(run: TrialRun, compressed: Compressed, candidate) -> tuple[float, ...]:
    ctx, cfg, measure = run.ctx, run.ctx.config, run.ctx.measure
    baseline = run.trial.user_attrs.get(BASELINE_ATTR)  # the baselines are measured in full: what a study beats
    subset = getattr(candidate, "windows", None)  # a selection stage's draw of windows (EvoPress)
    stop = EarlyStop(ctx, run.trial.study, compressed.footprint.compression_ratio) \
        if cfg.early_stop and not baseline and subset is None else None
    device = ctx.executor.loaded.device
    compress_peak = peak_memory(device)
    reset_peak_memory(device)
    result = measure.score(ctx.executor, cfg.batch_size, stop=stop, subset=subset)
    eval_peak = peak_memory(device)
    run.record(**measure.attrs(result), **{k: max(v, compress_peak.get(k, 0)) for k, v in eval_peak.items()},
               peak_memory_bytes=eval_peak.get("peak_device_memory_bytes", eval_peak.get("peak_host_memory_bytes")))
    value, name = result.value, measure.objective
    cap = cfg.ppl_cap_factor * measure.dense_value if measure.capped and measure.dense_value else math.inf
    set_constraint(run.trial, "perplexity_cap", math.inf if math.isnan(value) else 0.0 if cap == math.inf
                   else value - cap)
    if not math.isfinite(value):
        raise run.stop(TrialStatus.NONFINITE, f"{name} is {value} (the compressed model diverges)")
    if result.stopped:
        raise run.stop(TrialStatus.EARLY_STOPPED, result.stopped)
    if subset is not None:
        raise run.stop(TrialStatus.STAGE, f"selection stage {candidate.stage + 1} of generation "
                                          f"{candidate.generation}: scored on {len(subset)} windows; the best go on")
    if value > cap:  # evaluated in full (no early stop) and over the cap: measured, infeasible
        run.record(status=TrialStatus.OVER_CAP, reason=f"{name} {value:.4g} exceeds the cap {cap:.4g} "
                                                        f"({cfg.ppl_cap_factor}x dense)")
    else:
        run.record(status=TrialStatus.OK)
    return run.values()


class EarlyStop:
    """`stop(running value, windows done)` for one candidate: a reason to stop, or None. References are taken
    on the windows the candidate has done (their full figure where no per-window record exists)."""

    RATIO_SLACK = 1e-4  # a dynamic study's profiles at the target differ by a few bytes: all are rivals

    def __init__(self, ctx: TrialSetup, study: optuna.Study, ratio: float):
        self.ctx, self.cfg, self.measure = ctx, ctx.config, ctx.measure
        self.slack = self.RATIO_SLACK if ctx.config.dynamic else 0.0
        # a static trial has paid minutes of compression before its first window: judge it on a quarter of them;
        # a dynamic one is assembled in milliseconds and its windows are its whole cost (EvoPress's first
        # selection step: few tokens, more only for those that keep up): an eighth
        self.min_windows = max(1, self.measure.windows.shape[0] // (8 if ctx.config.dynamic else 4))
        name, losses = self.measure.objective, self.measure.loss_attr
        # (value, ratio, number, value over the first k windows) of the finished feasible trials with at least
        # this ratio: what the candidate is compared with
        self.rivals = [(t.user_attrs[name], t.user_attrs["compression_ratio"], t.number,
                        self.measure.curve(t.user_attrs[losses]) if t.user_attrs.get(losses) else None)
                       for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                       if name in t.user_attrs and t.user_attrs.get("compression_ratio", -1) >= ratio - self.slack
                       and is_feasible(t.constraints)]

    def __call__(self, running: float, done: int) -> str | None:
        cfg, name, dense = self.cfg, self.measure.objective, self.measure.dense_curve
        if self.measure.capped and dense and running > cfg.ppl_cap_factor * dense[done - 1]:
            return (f"running {name} {running:.4g} after {done} windows exceeds {cfg.ppl_cap_factor}x the "
                    f"dense model's on the same windows ({dense[done - 1]:.4g})")
        if done >= self.min_windows and OBJECTIVES[name] == "minimize":
            for value, ratio, number, curve in self.rivals:
                theirs = curve[done - 1] if curve else value
                if running > cfg.dominance_margin * theirs:
                    return (f"running {name} {running:.4g} after {done} windows is over {cfg.dominance_margin}x "
                            f"that of trial {number} ({theirs:.4g} on the same windows) at ratio {ratio:.4f}")
        return None


def _replay(run: TrialRun, earlier: FrozenTrial) -> tuple[float, ...]:
    """A sampler proposed a configuration already measured in this study: reuse its figures."""
    own = (BASELINE_ATTR, "worker")  # the earlier trial's role and process are its own, not this trial's
    run.record(**{k: v for k, v in earlier.user_attrs.items() if k not in own}, duplicate_of=earlier.number)
    for key in CONSTRAINTS:
        if key in earlier.constraints:
            set_constraint(run.trial, key, earlier.constraints[key])
    run.finish()
    if earlier.state == TrialState.COMPLETE:
        return tuple(earlier.values)
    raise Stopped(f"same configuration as trial {earlier.number}")


def _twin_after_record(study: optuna.Study, key: str, number: int) -> FrozenTrial | None:
    """Another trial holding this configuration, running or finished, looked up in one read after this trial
    recorded its own: of two trials with one configuration, the later to look always sees the earlier, so two
    workers never both measure it (at worst both yield, and the sampler proposes it again)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)):
        if t.number != number and t.user_attrs.get("candidate") == key and "duplicate_of" not in t.user_attrs \
                and t.user_attrs.get("status") != TrialStatus.SPARE.value \
                and (t.state == TrialState.RUNNING or t.user_attrs.get("status") is not None):
            return t
    return None
