"""The study: Optuna storage, the candidate grid sampler, the objective, and the run loop.

Every candidate pipeline is one Optuna trial with two objectives, perplexity (minimize) and compression ratio
(maximize), and one constraint, ratio >= target. The grid is exact: `CandidateSampler` walks the candidate list
in order (single methods, then hybrids) and answers the define-by-run suggestions (`pipeline`, then
`method.param` per step) from the candidate, so each configuration runs once and the dashboard shows the real
parameters. A killed trial is failed by the storage heartbeat and retried with the same candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import datetime
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from compactmind import pipeline as pl
from compactmind.calibration import Calibration
from compactmind.config import RunConfig
from compactmind.data import Dataset
from compactmind.errors import CompactMindError, StorageError
from compactmind.evaluate import perplexity, running_perplexity
from compactmind.footprint import Reference, measure
from compactmind.models import LoadedModel, Snapshot
from compactmind.registry import get_method
from compactmind.space import Categorical, Int

log = logging.getLogger(__name__)

CANDIDATE_ATTR = "compactmind:candidate"
SPARE_ATTR = "compactmind:spare"  # a grid trial that found every candidate taken by other workers
STUDY_ATTR = "compactmind"
HEARTBEAT_S = 5
GRACE_S = 20
OBJECTIVES = ["perplexity", "compression_ratio"]
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded with every trial: which process ran it


# ---- storage ---------------------------------------------------------------------------------------------


def safe_url(url: str) -> str:
    """The storage URL with any password masked, for logs and reports."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def scrub(text: str, url: str) -> str:
    """text with the URL's password masked wherever it appears (driver errors may quote the URL)."""
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:
        password = None
    return text.replace(url, safe_url(url)).replace(password, "***") if password else text


def check_storage(url: str, create: bool = True) -> None:
    """Checks that need no connection (nothing is created): the URL's form, and for SQLite the file itself."""
    if "://" not in url:
        raise StorageError(f"--storage {safe_url(url)!r} is not a database URL; use e.g. sqlite:///storage/study.db "
                           "or postgresql://user@host/db.")
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.exists() and not create:
            raise StorageError(f"The study database {path} does not exist; run a study first or pass --storage.")
        if path.is_dir():
            raise StorageError(f"--storage points at the folder {path}; give a database file inside it.")
        parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise StorageError(f"Cannot create the study database {path}: its folder is not writable.")
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as fh:
                if fh.read(16) != b"SQLite format 3\x00":
                    raise StorageError(f"{path} is not an SQLite database; pass another --storage file.")
            if not create and not _has_studies_table(path):
                raise StorageError(f"{path} is an SQLite database but holds no Optuna studies; pass the --storage "
                                   "a study was run with.")


def _has_studies_table(path: Path) -> bool:
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return con.execute("select 1 from sqlite_master where type='table' and name='studies'").fetchone() \
                is not None
        finally:
            con.close()
    except sqlite3.Error:
        return False


SQLITE_BUSY_TIMEOUT_S = 30.0  # SQLite's own busy wait on a locked file, per statement
LOCKED_RETRIES = 8  # then ours: the whole storage call again, after 0.1, 0.2, 0.4 ... 12.8 s


def _is_locked(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        text = str(exc).lower()
        if "database is locked" in text or "database is busy" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _retry_locked(call):
    def retried(self, *args, **kwargs):
        for attempt in range(LOCKED_RETRIES + 1):
            try:
                return call(self, *args, **kwargs)
            except Exception as exc:  # a locked file rolls the transaction back, so the call can run again
                if attempt == LOCKED_RETRIES or not _is_locked(exc):
                    raise
                delay = 0.1 * 2 ** attempt
                log.warning("the study database is locked; retrying in %.1f s", delay)
                time.sleep(delay)

    retried.__name__ = call.__name__
    retried.__doc__ = call.__doc__
    return retried


class SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage on an SQLite file, with every call retried with exponential backoff while the file
    is locked by another process (SQLite returns "database is locked" at once in some write-upgrade races,
    before its own busy wait applies)."""


for _name, _call in vars(optuna.storages.RDBStorage).items():
    if callable(_call) and (not _name.startswith("_") or _name == "_get_stale_trial_ids") and _name not in (
            "upgrade", "remove_session", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"):
        setattr(SQLiteStorage, _name, _retry_locked(_call))


def open_storage(url: str, create: bool = True) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeat (a killed trial becomes FAIL and is retried once its heartbeat is stale)."""
    check_storage(url, create)
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if str(path) not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if sqlite else {"pool_pre_ping": True}
    storage_class = SQLiteStorage if sqlite else optuna.storages.RDBStorage
    try:
        with warnings.catch_warnings():  # heartbeat and retry are marked experimental; they are what we rely on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return storage_class(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = scrub(first, url)
        raise StorageError(f"Cannot open the storage {safe_url(url)}: {first}; check --storage "
                           "(an Optuna RDB URL such as sqlite:///storage/compactmind.db).") from exc


def load_study(storage, study_name: str) -> optuna.Study:
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name not in names:
        known = ", ".join(names) if names else "none"
        raise StorageError(f"No study named {study_name!r} in this storage (studies there: {known}).")
    return optuna.load_study(study_name=study_name, storage=storage)


# ---- sampler ---------------------------------------------------------------------------------------------


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
        # Several workers may pick the same next candidate at the same moment. Each writes its pick, then looks
        # for another holder; whoever sees one moves on, so no candidate runs twice.
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


def make_sampler(strategy: str, candidates: list[pl.Pipeline], seed: int) -> BaseSampler:
    """The exact candidate grid, or one of Optuna's samplers over the structured space."""
    samplers = optuna.samplers
    if strategy == "grid":
        return CandidateSampler(candidates)
    if strategy == "tpe":
        return samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if strategy == "nsga2":
        return samplers.NSGAIISampler(seed=seed)
    if strategy == "random":
        return samplers.RandomSampler(seed=seed)
    if strategy == "qmc":
        return samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if strategy == "gp":
        return samplers.GPSampler(seed=seed)
    if strategy == "bruteforce":
        return samplers.BruteForceSampler(seed=seed)
    raise ValueError(strategy)


# ---- the objective ---------------------------------------------------------------------------------------


@dataclass
class Context:
    """Everything a trial needs, built once per study."""

    loaded: LoadedModel
    data: Dataset
    config: RunConfig
    candidates: list[pl.Pipeline]
    snapshot: Snapshot
    reference: Reference
    calibration: Calibration
    dense_perplexity: float
    spaces: dict[str, dict]  # effective search space per method
    on_trial: Callable[[dict], None] | None = None
    on_window: Callable[[int, int], None] | None = None  # (windows done, windows) during an evaluation
    dense_running: list[float] | None = None  # the dense model's perplexity over its first k windows

    @property
    def shapes(self) -> list[str]:
        return list(dict.fromkeys(c.shape for c in self.candidates))


CONSTRAINTS = ("target_ratio", "perplexity_cap")  # ratio >= target; perplexity <= cap factor x dense


def _set_constraint(trial: optuna.Trial, key: str, value: float) -> None:
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


def _replay(trial: optuna.Trial, earlier: FrozenTrial) -> tuple[float, float]:
    """A sampler proposed a configuration already measured in this study: reuse its figures."""
    for k, v in earlier.user_attrs.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("duplicate_of", earlier.number)
    for key in CONSTRAINTS:
        if key in earlier.constraints:
            _set_constraint(trial, key, earlier.constraints[key])
    if earlier.state == TrialState.COMPLETE:
        return tuple(earlier.values)
    raise optuna.TrialPruned(f"same configuration as trial {earlier.number}")


def _finished_twin(study: optuna.Study, label: str, number: int) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.number != number and t.user_attrs.get("pipeline") == label and "duplicate_of" not in t.user_attrs \
                and t.user_attrs.get("status") not in (None, "spare"):
            return t
    return None


def _rivals(study: optuna.Study, ratio: float, seq_len: int) -> list[tuple[float, float, int, list[float] | None]]:
    """(perplexity, ratio, number, perplexity over the first k windows) of the finished feasible trials with at
    least this ratio: what a running candidate is compared with."""
    return [(t.values[0], t.values[1], t.number, running_perplexity(t.user_attrs["window_nll"], seq_len)
             if t.user_attrs.get("window_nll") else None)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values[1] >= ratio and all(v <= 0 for v in t.constraints.values())]


def objective(ctx: Context, trial: optuna.Trial) -> tuple[float, float]:
    cfg, model = ctx.config, ctx.loaded.model
    if trial.storage.get_trial_system_attrs(trial._trial_id).get(SPARE_ATTR):
        trial.set_user_attr("status", "spare")
        trial.set_user_attr("reason", "every remaining candidate was taken by another worker")
        raise optuna.TrialPruned("spare")
    candidate = suggest_pipeline(trial, ctx.shapes, ctx.spaces)
    twin = _finished_twin(trial.study, str(candidate), trial.number)
    if twin is not None:
        return _replay(trial, twin)
    attrs: dict[str, Any] = {"pipeline": str(candidate), "steps": candidate.to_json(), "worker": WORKER,
                             "hybrid": candidate.is_hybrid, "dtype": str(ctx.loaded.dtype).replace("torch.", ""),
                             "seq_len": ctx.data.seq_len}

    def record(**more):
        attrs.update(more)
        for k, v in more.items():
            trial.set_user_attr(k, v)

    record(**attrs)
    _reset_peak_memory(ctx.loaded.device)
    try:
        ctx.snapshot.restore()
        try:
            seconds = pl.apply_(model, candidate, ctx.calibration, cfg.seed)
        except CompactMindError as exc:
            record(status="invalid", reason=str(exc))
            _finish(ctx, trial.number, attrs)
            raise optuna.TrialPruned(str(exc)) from None
        fp = measure(model, ctx.reference)
        record(compression_ratio=fp.compression_ratio, bits_per_weight=fp.bits_per_weight, sparsity=fp.sparsity,
               model_bytes=fp.model_bytes, compress_seconds=seconds)
        _set_constraint(trial, "target_ratio", cfg.target_ratio - fp.compression_ratio)
        if fp.compression_ratio < cfg.target_ratio:
            _set_constraint(trial, "perplexity_cap", 0.0)  # not measured: the ratio alone makes it infeasible
            record(status="infeasible", reason=f"compression ratio {fp.compression_ratio:.4f} is below the "
                                               f"target {cfg.target_ratio}", windows=0, eval_tokens=0)
            _finish(ctx, trial.number, attrs)
            raise optuna.TrialPruned("infeasible")
        cap = cfg.ppl_cap_factor * ctx.dense_perplexity
        rivals = _rivals(trial.study, fp.compression_ratio, ctx.data.windows.shape[1]) if cfg.early_stop else []
        min_windows = max(1, ctx.data.windows.shape[0] // 4)

        def stop(running: float, done: int) -> str | None:
            # References on the windows the candidate has done (their full figure where none was recorded).
            dense_here = ctx.dense_running[done - 1] if ctx.dense_running else ctx.dense_perplexity
            if running > cfg.ppl_cap_factor * dense_here:
                return (f"running perplexity {running:.4g} after {done} windows exceeds {cfg.ppl_cap_factor}x the "
                        f"dense model's on the same windows ({dense_here:.4g})")
            if done >= min_windows:
                for p, r, n, curve in rivals:
                    theirs = curve[done - 1] if curve else p
                    if running > cfg.dominance_margin * theirs:
                        return (f"running perplexity {running:.4g} after {done} windows is over "
                                f"{cfg.dominance_margin}x that of trial {n} ({theirs:.4g} on the same windows) at "
                                f"ratio {r:.4f}")
            return None

        result = perplexity(model, ctx.data.windows, cfg.batch_size, stop=stop if cfg.early_stop else None,
                            progress=ctx.on_window)
        record(perplexity=result.perplexity, eval_seconds=result.seconds, windows=result.windows,
               eval_tokens=result.tokens, **_peak_memory(ctx.loaded.device))
        trial.set_user_attr("window_nll", [round(x, 4) for x in result.window_nll])  # for later comparisons
        _set_constraint(trial, "perplexity_cap", result.perplexity - cap if not math.isnan(result.perplexity)
                        else math.inf)
        if not math.isfinite(result.perplexity):
            record(status="nonfinite", reason=f"perplexity is {result.perplexity} (the compressed model diverges)")
            _finish(ctx, trial.number, attrs)
            raise optuna.TrialPruned("non-finite perplexity")
        if result.stopped:
            record(status="early_stopped", reason=result.stopped)
            _finish(ctx, trial.number, attrs)
            raise optuna.TrialPruned(result.stopped)
        if result.perplexity > cap:  # evaluated in full (no early stop) and over the cap: measured, infeasible
            record(status="over_cap", reason=f"perplexity {result.perplexity:.4g} exceeds the cap {cap:.4g} "
                                             f"({cfg.ppl_cap_factor}x dense)")
        else:
            record(status="ok")
        _finish(ctx, trial.number, attrs)
        return result.perplexity, fp.compression_ratio
    except (optuna.TrialPruned, KeyboardInterrupt):
        raise
    except Exception as exc:  # out of memory or a bug in one method: record it, free memory, go on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        record(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        _finish(ctx, trial.number, attrs)
        raise


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: "5" resets this process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> dict[str, int]:
    """Peak memory since the last reset: on the GPU (allocated by torch) and in host RAM (resident set)."""
    out = {}
    if device.type == "cuda":
        out["peak_device_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_host_memory_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _finish(ctx: Context, number: int, attrs: dict) -> None:
    if ctx.on_trial:
        ctx.on_trial({"number": number, **attrs})


# ---- running a study -------------------------------------------------------------------------------------


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def study_identity(loaded: LoadedModel, data: Dataset, cfg: RunConfig, candidates: list[pl.Pipeline]) -> dict:
    n_params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "model": {"name": loaded.name, "source": loaded.source, "parameters": n_params},
        "data": data.info,
        "protocol": {"seq_len": data.seq_len, "windows": data.info["windows"], "dtype": str(loaded.dtype),
                     "data_samples": cfg.data_samples, "seed": cfg.seed, "baseline_bits": cfg.baseline_bits},
        "target_ratio": cfg.target_ratio,
        "search_space": fingerprint([str(c) for c in candidates]),
    }


def create_or_resume(storage, name: str, identity: dict, config: dict | None = None) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists and matches; a different study under the name is refused."""
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage)
        stored = study.user_attrs.get(STUDY_ATTR, {}).get("identity")
        if stored is not None and fingerprint(stored) != fingerprint(identity):
            differs = sorted(k for k in identity if json.dumps(identity[k], sort_keys=True, default=str)
                             != json.dumps(stored.get(k), sort_keys=True, default=str))
            raise StorageError(f"Study {name!r} was made with a different {', '.join(differs)}; pass a new "
                               "--study_name (or leave it out to get one keyed by these settings).")
        if stored is None:  # the creating process died before it could write the study's settings
            _describe(study, identity, config)
        return study, True
    study = optuna.create_study(study_name=name, storage=storage, directions=["minimize", "maximize"],
                                load_if_exists=True)
    _describe(study, identity, config)
    return study, False


def _describe(study: optuna.Study, identity: dict, config: dict | None) -> None:
    study.set_metric_names(OBJECTIVES)
    meta = dict(study.user_attrs.get(STUDY_ATTR, {}))
    meta.update(identity=identity, config=config or {})
    study.set_user_attr(STUDY_ATTR, meta)


def stored_config(study: optuna.Study) -> dict:
    """The settings the study was created with (what a worker needs to join it)."""
    config = study.user_attrs.get(STUDY_ATTR, {}).get("config")
    if not config:
        raise StorageError(f"Study {study.study_name!r} was not created by compactmind (no stored settings); "
                           "start it with 'compactmind run' or 'compactmind create'.")
    return config


def default_study_name(identity: dict) -> str:
    return f"{identity['model']['name']}-{fingerprint(identity)}"


def dense_baseline(study: optuna.Study, ctx_parts: tuple[LoadedModel, Dataset, RunConfig]) -> dict:
    """The dense model's perplexity, measured once per study and kept in the study."""
    meta = dict(study.user_attrs.get(STUDY_ATTR, {}))
    if "dense" in meta:
        return meta["dense"]
    loaded, data, cfg = ctx_parts
    result = perplexity(loaded.model, data.windows, cfg.batch_size)
    meta["dense"] = {"perplexity": result.perplexity, "windows": result.windows, "tokens": result.tokens,
                     "seconds": result.seconds, "compression_ratio": 0.0,
                     "dtype": str(loaded.dtype).replace("torch.", ""),
                     "window_nll": [round(x, 4) for x in result.window_nll]}
    study.set_user_attr(STUDY_ATTR, meta)
    return meta["dense"]


def run(study: optuna.Study, ctx: Context, sampler: BaseSampler) -> None:
    """Run trials until the grid is done (here or by other workers) or the budget (--n_trials/--timeout) is
    spent. Trials left RUNNING by dead workers are failed by the heartbeat and retried."""
    cfg = ctx.config
    study.sampler = sampler
    started, count = time.monotonic(), 0

    def budget_left() -> bool:
        return (cfg.n_trials is None or count < cfg.n_trials) and \
            (cfg.timeout is None or time.monotonic() - started < cfg.timeout)

    interrupted = {"stop": False, "inside": False}

    def on_sigint(_signum, _frame):
        # Ctrl-C inside a trial raises there, so Optuna marks that trial FAIL (it is re-run on resume); outside
        # one (while a trial is being created) it only asks the loop to stop, so no trial is left RUNNING.
        interrupted["stop"] = True
        if interrupted["inside"]:
            raise KeyboardInterrupt

    def guarded(trial):
        if interrupted["stop"]:
            raise KeyboardInterrupt
        interrupted["inside"] = True
        try:
            return objective(ctx, trial)
        finally:
            interrupted["inside"] = False

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        if not isinstance(sampler, CandidateSampler):
            n = cfg.n_trials if cfg.n_trials or cfg.timeout or cfg.strategy == "bruteforce" else 100
            study.optimize(guarded, n_trials=n, timeout=cfg.timeout, catch=(Exception,))
            return
        while budget_left():
            if interrupted["stop"]:
                raise KeyboardInterrupt
            optuna.storages.fail_stale_trials(study)
            _fail_orphans(study)
            trials = study.get_trials(deepcopy=False)
            if any(t.state == TrialState.WAITING for t in trials) or sampler.remaining(study):
                study.optimize(guarded, n_trials=1, catch=(Exception,))
                count += 1
                continue
            if any(t.state == TrialState.RUNNING for t in trials):
                time.sleep(HEARTBEAT_S)  # another worker's trial, or one a dead process left: wait for heartbeat
                continue
            return
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def _fail_orphans(study: optuna.Study) -> None:
    """A process killed while Optuna was still creating a trial leaves it RUNNING before its first heartbeat, so
    the heartbeat never marks it stale. Such a trial has no parameters yet (they are the objective's first
    act); once it is older than the grace period it is failed here, and its candidate goes back to the grid."""
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not t.params and t.datetime_start and (now - t.datetime_start).total_seconds() > GRACE_S:
            try:
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # finished meanwhile (another worker failed it, or it was alive after all)


def make_context(loaded: LoadedModel, data: Dataset, cfg: RunConfig, candidates, dense: dict,
                 snapshot: Snapshot, on_trial=None, on_window=None) -> Context:
    return Context(loaded, data, cfg, candidates, snapshot, Reference.of(loaded.model, cfg.baseline_bits),
                   Calibration(data.calib), dense["perplexity"], pl.search_spaces(cfg.methods, cfg.grids), on_trial,
                   on_window, running_perplexity(dense["window_nll"], data.seq_len) if dense.get("window_nll") else None)


# ---- reading a study back --------------------------------------------------------------------------------


def trial_record(t: FrozenTrial) -> dict:
    rec = {"number": t.number, "state": t.state.name,
           "perplexity": t.values[0] if t.values else t.user_attrs.get("perplexity"),
           "compression_ratio": t.values[1] if t.values else t.user_attrs.get("compression_ratio"),
           "feasible": all(v <= 0 for v in t.constraints.values()) if t.constraints else None,
           "params": dict(t.params),
           "started": t.datetime_start.isoformat() if t.datetime_start else None,
           "finished": t.datetime_complete.isoformat() if t.datetime_complete else None,
           "duration_seconds": t.duration.total_seconds() if t.duration else None}
    for k, v in t.user_attrs.items():
        rec.setdefault(k, v)
    if "failed_trial" in t.system_attrs:
        rec["retry_of"] = t.system_attrs["failed_trial"]
    return rec


def collect(study: optuna.Study, storage_url: str) -> dict:
    """Everything a report needs, from the storage alone."""
    meta = study.user_attrs.get(STUDY_ATTR, {})
    identity = meta.get("identity", {})
    trials = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    target = identity.get("target_ratio", 0.0)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    pareto = sorted((trial_record(t) for t in study.best_trials), key=lambda r: r["compression_ratio"]) \
        if complete else []
    feasible = [r for r in trials if r["state"] == "COMPLETE" and r["feasible"] is not False
                and r["compression_ratio"] >= target]
    best = min(feasible, key=lambda r: r["perplexity"]) if feasible else None
    return {"study": study.study_name, "storage": safe_url(storage_url), "model": identity.get("model"),
            "data": identity.get("data"), "protocol": identity.get("protocol"), "target_ratio": target,
            "objectives": {"perplexity": "minimize", "compression_ratio": "maximize"},
            "dense": meta.get("dense"), "best": best, "pareto_front": pareto, "trials": trials,
            "counts": {s.name: sum(1 for r in trials if r["state"] == s.name) for s in TrialState}}
