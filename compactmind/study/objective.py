"""The objective: one trial's life, from the sampler's proposal to the values the study records.

A trial restores the pristine model, applies the proposed pipeline (the executor), and measures its footprint.
Below the target ratio it is recorded as infeasible without an evaluation. Otherwise its perplexity is
measured window by window, and it stops early once its running perplexity exceeds the cap (ppl_cap_factor x the
dense model's on the same windows) or, after a quarter of the windows, dominance_margin x that of a finished
feasible trial with at least its ratio (Optuna's pruners refuse two-objective studies, so early stopping lives
here). Every figure a person wants later goes into the trial's user attributes; the objective values are read
from them by name, in the order of the study's objectives.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from compactmind import pipeline as pl
from compactmind.config import RunConfig
from compactmind.errors import CompactMindError
from compactmind.evaluate import running_perplexity
from compactmind.registry import get_method
from compactmind.space import Categorical, Int
from compactmind.study.sampler import SPARE_ATTR
from compactmind.trial import Compressed, Executor, peak_memory, reset_peak_memory

log = logging.getLogger(__name__)

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded with every trial: which process ran it
CONSTRAINTS = ("target_ratio", "perplexity_cap")  # ratio >= target; perplexity <= cap factor x dense


class TrialStatus(str, enum.Enum):
    OK = "ok"
    INFEASIBLE = "infeasible"  # below the target ratio: not evaluated
    INVALID = "invalid"  # the pipeline cannot apply to this model
    EARLY_STOPPED = "early_stopped"
    OVER_CAP = "over_cap"  # evaluated in full, perplexity over the cap: measured, infeasible
    NONFINITE = "nonfinite"
    FAILED = "failed"  # an error inside the trial (out of memory, a bug in one method)
    SPARE = "spare"  # a grid trial that found every candidate taken by other workers


@dataclass
class Context:
    """Everything a trial needs, built once per study."""

    executor: Executor
    config: RunConfig
    candidates: list[pl.Pipeline]
    spaces: dict[str, dict]  # effective search space per method
    dense: dict  # the dense baseline as the study stores it
    on_trial: Callable[[dict], None] | None = None
    on_window: Callable[[int, int], None] | None = None  # (windows done, windows) during an evaluation

    @cached_property
    def shapes(self) -> list[str]:
        return list(dict.fromkeys(c.shape for c in self.candidates))

    @cached_property
    def dense_running(self) -> list[float] | None:
        """The dense model's perplexity over its first k windows."""
        nll = self.dense.get("window_nll")
        return running_perplexity(nll, self.executor.data.seq_len) if nll else None


def _suggest(trial: optuna.Trial, name: str, spec):
    if isinstance(spec, Categorical):
        return trial.suggest_categorical(name, list(spec.choices))
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


def feasible(t: FrozenTrial) -> bool:
    return all(v <= 0 for v in t.constraints.values())


class Stopped(optuna.TrialPruned):
    """The trial ends without objective values; its status and reason are recorded."""


class TrialRun:
    """One trial: its attributes, written to the storage as they become known."""

    def __init__(self, ctx: Context, trial: optuna.Trial):
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
        if self.ctx.on_trial:
            self.ctx.on_trial({"number": self.trial.number, **self.attrs})


def objective(ctx: Context, trial: optuna.Trial) -> tuple[float, ...]:
    _heartbeat_now(trial)
    run = TrialRun(ctx, trial)
    if trial.storage.get_trial_system_attrs(trial._trial_id).get(SPARE_ATTR):
        raise run.stop(TrialStatus.SPARE, "every remaining candidate was taken by another worker")
    candidate = suggest_pipeline(trial, ctx.shapes, ctx.spaces)
    twin = _finished_twin(trial.study, str(candidate), trial.number)
    if twin is not None:
        return _replay(trial, twin)
    run.record(pipeline=str(candidate), steps=candidate.to_json(), worker=WORKER, hybrid=candidate.is_hybrid,
               dtype=str(ctx.executor.loaded.dtype).replace("torch.", ""), seq_len=ctx.executor.data.seq_len)
    reset_peak_memory(ctx.executor.loaded.device)
    try:
        compressed = _compress(run, candidate)
        _check_ratio(run, compressed)
        values = _evaluate(run, compressed)
    except optuna.TrialPruned:
        run.finish()
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # out of memory or a bug in one method: record it, free memory, go on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        run.record(status=TrialStatus.FAILED, reason=f"{type(exc).__name__}: {exc}"[:500])
        run.finish()
        raise
    run.finish()
    return values


def _heartbeat_now(trial: optuna.Trial) -> None:
    """Record the trial's first heartbeat before it takes any parameter. Optuna's heartbeat thread starts with
    the trial but may not have run yet when the objective sets parameters; a process killed in that gap would
    leave a RUNNING trial with parameters and no heartbeat, which nothing ever fails. With this, a trial without
    parameters is an orphan (failed after the grace period, see session._fail_orphans) and one with parameters
    has a heartbeat that goes stale."""
    storage = trial.storage
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        storage.record_heartbeat(trial._trial_id)


def _compress(run: TrialRun, candidate: pl.Pipeline) -> Compressed:
    try:
        compressed = run.ctx.executor.compress(candidate)
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


def _evaluate(run: TrialRun, compressed: Compressed) -> tuple[float, ...]:
    ctx, cfg = run.ctx, run.ctx.config
    stop = EarlyStop(ctx, run.trial.study, compressed.footprint.compression_ratio) if cfg.early_stop else None
    device = ctx.executor.loaded.device
    compress_peak = peak_memory(device)
    reset_peak_memory(device)
    result = ctx.executor.evaluate(cfg.batch_size, stop=stop, progress=ctx.on_window)
    eval_peak = peak_memory(device)
    run.record(perplexity=result.perplexity, eval_seconds=result.seconds, windows=result.windows,
               eval_tokens=result.tokens, **{k: max(v, compress_peak.get(k, 0)) for k, v in eval_peak.items()},
               peak_memory_bytes=eval_peak.get("peak_device_memory_bytes", eval_peak.get("peak_host_memory_bytes")))
    run.record(window_nll=[round(x, 4) for x in result.window_nll])  # for later like-for-like comparisons
    cap = cfg.ppl_cap_factor * ctx.dense["perplexity"]
    set_constraint(run.trial, "perplexity_cap",
                   result.perplexity - cap if not math.isnan(result.perplexity) else math.inf)
    if not math.isfinite(result.perplexity):
        raise run.stop(TrialStatus.NONFINITE, f"perplexity is {result.perplexity} (the compressed model diverges)")
    if result.stopped:
        raise run.stop(TrialStatus.EARLY_STOPPED, result.stopped)
    if result.perplexity > cap:  # evaluated in full (no early stop) and over the cap: measured, infeasible
        run.record(status=TrialStatus.OVER_CAP, reason=f"perplexity {result.perplexity:.4g} exceeds the cap "
                                                        f"{cap:.4g} ({cfg.ppl_cap_factor}x dense)")
    else:
        run.record(status=TrialStatus.OK)
    return run.values()


class EarlyStop:
    """`stop(running perplexity, windows done)` for one candidate: a reason to stop, or None. References are
    taken on the windows the candidate has done (their full figure where none was recorded)."""

    def __init__(self, ctx: Context, study: optuna.Study, ratio: float):
        self.ctx, self.cfg = ctx, ctx.config
        self.min_windows = max(1, ctx.executor.data.windows.shape[0] // 4)
        seq_len = ctx.executor.data.seq_len
        # (perplexity, ratio, number, perplexity over the first k windows) of the finished feasible trials with
        # at least this ratio: what the candidate is compared with
        self.rivals = [(t.user_attrs["perplexity"], t.user_attrs["compression_ratio"], t.number,
                        running_perplexity(t.user_attrs["window_nll"], seq_len) if t.user_attrs.get("window_nll")
                        else None)
                       for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                       if t.user_attrs.get("compression_ratio", -1) >= ratio and feasible(t)]

    def __call__(self, running: float, done: int) -> str | None:
        cfg = self.cfg
        dense_here = self.ctx.dense_running[done - 1] if self.ctx.dense_running else self.ctx.dense["perplexity"]
        if running > cfg.ppl_cap_factor * dense_here:
            return (f"running perplexity {running:.4g} after {done} windows exceeds {cfg.ppl_cap_factor}x the "
                    f"dense model's on the same windows ({dense_here:.4g})")
        if done >= self.min_windows:
            for p, r, n, curve in self.rivals:
                theirs = curve[done - 1] if curve else p
                if running > cfg.dominance_margin * theirs:
                    return (f"running perplexity {running:.4g} after {done} windows is over {cfg.dominance_margin}x "
                            f"that of trial {n} ({theirs:.4g} on the same windows) at ratio {r:.4f}")
        return None


def _replay(trial: optuna.Trial, earlier: FrozenTrial) -> tuple[float, ...]:
    """A sampler proposed a configuration already measured in this study: reuse its figures."""
    for k, v in earlier.user_attrs.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("duplicate_of", earlier.number)
    for key in CONSTRAINTS:
        if key in earlier.constraints:
            set_constraint(trial, key, earlier.constraints[key])
    if earlier.state == TrialState.COMPLETE:
        return tuple(earlier.values)
    raise Stopped(f"same configuration as trial {earlier.number}")


def _finished_twin(study: optuna.Study, label: str, number: int) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.number != number and t.user_attrs.get("pipeline") == label and "duplicate_of" not in t.user_attrs \
                and t.user_attrs.get("status") not in (None, TrialStatus.SPARE.value):
            return t
    return None
