"""A study's life: create it or resume it (refusing one made with other settings), measure the dense baseline
once, run trials until the grid or the budget is done (here and in other workers), and write its reports.

A study stores its identity (model, data, protocol, target, objectives, search space) and its settings
(`RunConfig.to_dict(study_only=True)`); a worker rebuilds its RunConfig from them with `from_dict`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from compactmind import pipeline as pl
from compactmind.config import LOCAL_FIELDS, OBJECTIVES, RunConfig
from compactmind.errors import ConfigError, StorageError
from compactmind.data import Dataset
from compactmind.models import LoadedModel
from compactmind.study import records as rec
from compactmind.study import profiles
from compactmind.study.objective import Context, Terminated, TrialFailed, objective, record_signal
from compactmind.study.records import STUDY_ATTR
from compactmind.study.sampler import STRATEGIES, CandidateSampler
from compactmind.study.spaces import LevelSpace, Measure, PipelineSpace
from compactmind.study.storage import (GRACE_S, HEARTBEAT_S, StorageTrouble, check_storage, load_study,
                                       open_storage, safe_url, scrub, study_names)
from compactmind.trial import SILENT, Executor, Progress, load

log = logging.getLogger(__name__)


def fingerprint(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def study_identity(loaded: LoadedModel, data: Dataset, cfg: RunConfig, candidates: list[pl.Pipeline]) -> dict:
    """What a study is, by content (never by path): a resumed run or a joining worker must match it."""
    n_params = sum(p.numel() for p in loaded.model.parameters())
    source = loaded.source_info or {}
    return {
        "model": {"name": loaded.name, "parameters": n_params, "weights": loaded.fingerprint,
                  **({"source_format": source["format"], "source_bytes": source["bytes"],
                      "source_bits_per_weight": round(source["bits_per_weight"], 4)} if source else {})},
        "data": {k: data.info[k] for k in ("eval_ids", "calib_ids", "selection_ids", "windows", "calib_samples")
                 if k in data.info},
        "protocol": {"seq_len": data.seq_len, "windows": data.info["windows"], "dtype": str(loaded.dtype)[6:],
                     "data_samples": cfg.data_samples, "seed": cfg.seed, "baseline_bits": cfg.baseline_bits},
        "target_ratio": cfg.target_ratio,
        "objectives": list(cfg.objectives),
        "search_space": fingerprint([str(c) for c in candidates]),
        "search": {"strategy": cfg.strategy, "ppl_cap_factor": cfg.ppl_cap_factor, "early_stop": cfg.early_stop,
                   "dominance_margin": cfg.dominance_margin},
        **({"dynamic": {"granularity": cfg.granularity, "fitness": cfg.fitness,
                        "selection_windows": cfg.selection_windows}} if cfg.dynamic else {}),
    }


def default_study_name(identity: dict) -> str:
    return f"{identity['model']['name']}-{fingerprint(identity)}"


_WHAT = {"model.weights": "model weights (their content changed)", "data.eval_ids": "evaluation text (its tokens "
         "changed)", "data.calib_ids": "calibration text (its tokens changed)", "data.selection_ids": "selection "
         "text (its tokens changed)"}


def _differences(stored: dict, now: dict, prefix: str = "") -> list[str]:
    """What differs between a stored identity and this run's, named for a person."""
    out = []
    for key in now:
        old, new, name = stored.get(key), now[key], f"{prefix}{key}"
        if fingerprint(old) == fingerprint(new):
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, f"{name}.")
        elif name in _WHAT:
            out.append(_WHAT[name])
        else:
            def shown(v):
                return ", ".join(map(str, v)) if isinstance(v, list) else str(v)
            out.append(f"{name} (the study: {shown(old)}; this run: {shown(new)})")
    return out


def check_identity(study: optuna.Study, identity: dict) -> None:
    """Refuse a study made with other content or settings than this run's, naming what changed."""
    stored = study.user_attrs.get(STUDY_ATTR, {}).get("identity")
    if stored is not None and fingerprint(stored) != fingerprint(identity):
        raise StorageError(f"Study {study.study_name!r} was made with a different "
                           f"{'; '.join(_differences(stored, identity))}; pass the same settings, or a new "
                           "--study_name (or leave it out to get one keyed by these settings).")


def create_or_resume(storage, name: str, identity: dict, about: dict, cfg: RunConfig) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists and matches; a different study under the name is refused.
    `about` (paths, labels) is recorded for reports but never compared."""
    if name in study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        check_identity(study, identity)
        if "identity" not in study.user_attrs.get(STUDY_ATTR, {}):  # its creator died before writing its settings
            _describe(study, identity, about, cfg)
        return study, True
    directions = [OBJECTIVES[o] for o in cfg.objectives]
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=True)
    _describe(study, identity, about, cfg)
    return study, False


def _describe(study: optuna.Study, identity: dict, about: dict, cfg: RunConfig) -> None:
    study.set_metric_names(list(cfg.objectives))
    meta = dict(study.user_attrs.get(STUDY_ATTR, {}))
    meta.update(identity=identity, about=about, config=cfg.to_dict(study_only=True))
    study.set_user_attr(STUDY_ATTR, meta)


def stored_config(study: optuna.Study) -> dict:
    """The settings the study was created with (what a worker needs to join it)."""
    config = study.user_attrs.get(STUDY_ATTR, {}).get("config")
    if not config:
        raise StorageError(f"Study {study.study_name!r} was not created by compactmind (no stored settings); "
                           "start it with 'compactmind run' or 'compactmind create'.")
    return config


def joined_config(local: RunConfig) -> RunConfig:
    """A worker's settings: the study's own, with this process's device, storage and budget."""
    study = load_study(open_storage(local.storage, create=False), local.study_name)
    mine = {k: v for k, v in local.to_dict().items() if k in LOCAL_FIELDS}
    return RunConfig.from_dict({**stored_config(study), **mine}, where=f"Study {local.study_name!r}'s settings")


def dense_baseline(study: optuna.Study, executor: Executor, batch_size: int) -> tuple[dict, bool]:
    """The dense model's perplexity on the test windows (and on a dynamic study's selection windows), measured
    once per study and kept in the study; (figures, measured now)."""
    meta = dict(study.user_attrs.get(STUDY_ATTR, {}))
    selection = executor.data.selection
    if "dense" in meta and (selection is None or "selection_perplexity" in meta["dense"]):
        return meta["dense"], False
    executor.restore()
    result = executor.evaluate(batch_size)
    dense = {"perplexity": result.perplexity, "windows": result.windows, "tokens": result.tokens,
             "seconds": result.seconds, "compression_ratio": 0.0, "sparsity": 0.0,
             "model_bytes": executor.reference.dense_bytes, "bits_per_weight": float(executor.reference.baseline_bits),
             "dtype": str(executor.loaded.dtype).replace("torch.", ""),
             "window_nll": [round(x, 4) for x in result.window_nll]}
    if selection is not None:
        picked = executor.evaluate(batch_size, windows=selection)
        dense.update(selection_perplexity=picked.perplexity, selection_kl=0.0,
                     selection_window_nll=[round(x, 4) for x in picked.window_nll])
    meta["dense"] = dense
    study.set_user_attr(STUDY_ATTR, meta)
    return dense, True


@dataclass
class Session:
    """An open study with its model, data and search space, ready to run trials."""

    study: optuna.Study
    config: RunConfig
    executor: Executor
    space: PipelineSpace | LevelSpace
    measure: Measure
    dense: dict
    resumed: bool
    dense_measured: bool

    @property
    def size(self) -> int | None:
        """How many configurations an exhaustive strategy runs (None: the space is searched to a budget)."""
        return len(self.space.candidates) if STRATEGIES[self.config.strategy].exhaustive else None

    def records(self) -> rec.StudyRecords:
        return rec.collect(self.study, self.config.storage)


def candidates_of(cfg: RunConfig, model=None) -> list[pl.Pipeline]:
    """The study's candidates (a dynamic study's levels); given the model, those that do the same to it as an
    earlier one are left out (logged)."""
    candidates = pl.candidates(list(cfg.methods) if cfg.methods else None, cfg.hybrids, cfg.grids)
    if not candidates:
        raise ConfigError("No candidate pipelines: --methods names no method; pass at least one.")
    if model is None:
        return candidates
    candidates, dropped = pl.distinct(model, candidates)
    for same, kept in dropped:
        log.info("%s does the same to this model as %s: searched once", same, kept)
    return candidates


def open_session(cfg: RunConfig, progress: Progress = SILENT) -> Session:
    """Load model and data, then create the study or resume it (refusing one made with other settings); a
    dynamic study also opens its level database. `progress` hears about every long step."""
    candidates_of(cfg)  # bad methods or grids fail before a long model load
    check_storage(cfg.storage)  # likewise, and nothing is created yet
    loaded, data = load(cfg)
    candidates = candidates_of(cfg, loaded.model)
    storage = open_storage(cfg.storage)
    identity = study_identity(loaded, data, cfg, candidates)
    about = {"model": {**identity["model"], "source": loaded.source}, "data": data.info,
             "candidates": [str(c) for c in candidates]}
    name = cfg.study_name or default_study_name(identity)
    study, resumed = create_or_resume(storage, name, identity, about, cfg)
    what = f"{len(candidates)} levels per {cfg.granularity}" if cfg.dynamic else \
        f"{len(candidates)} candidates ({sum(c.is_hybrid for c in candidates)} hybrid)"
    log.info("%s study %r in %s: %s, target ratio %s", "resuming" if resumed else "new", name,
             safe_url(cfg.storage), what, cfg.target_ratio)
    executor = Executor(loaded, data, cfg.seed, cfg.baseline_bits, progress=progress)
    dense, measured = dense_baseline(study, executor, cfg.batch_size)
    log.info("dense perplexity %.4f (%d windows; %s)", dense["perplexity"], dense["windows"],
             f"measured in {dense['seconds']:.1f} s" if measured else "read from the study")
    if cfg.dynamic:
        space = profiles.level_space(cfg, executor, candidates, study)
        measure = Measure(cfg.quality, data.selection, "selection_", dense)
        measure.prepare(executor)
    else:
        space = PipelineSpace(candidates, pl.search_spaces(cfg.methods, cfg.grids))
        measure = Measure("perplexity", data.windows, "", dense)
    return Session(study, cfg, executor, space, measure, dense, resumed, measured)


def run_trials(session: Session) -> str | None:
    """Run trials until the grid is done (here or by other workers) or the budget (--n_trials/--timeout) is
    spent. Returns None, or "interrupted" (Ctrl-C) or "terminated" (SIGTERM): the trial running then is failed
    with that reason and runs again when the study resumes. Trials left RUNNING by dead workers are failed by
    the heartbeat and retried."""
    cfg, study = session.config, session.study
    ctx = Context(session.executor, cfg, session.space, session.measure, session.dense)
    strategy = STRATEGIES[cfg.strategy]
    study.sampler = strategy.make(session.space, cfg.seed)
    guard = _Signals()
    optuna.storages.fail_stale_trials(study)  # trials a killed process left RUNNING: failed, then retried
    _fail_orphans(study)
    with guard:
        try:
            if isinstance(study.sampler, CandidateSampler):
                _run_grid(study, cfg, guard, guard.wrap(lambda trial: objective(ctx, trial)))
            else:
                budget = cfg.n_trials or (None if cfg.timeout or strategy.exhaustive else 100)
                study.optimize(guard.wrap(lambda trial: objective(ctx, trial)), n_trials=budget,
                               timeout=cfg.timeout, catch=(TrialFailed,))
            if cfg.dynamic:
                guard.inside = True  # a signal now interrupts the final measurement; it resumes next time
                profiles.finalize(study, session.space, session.executor, cfg.batch_size)
        except KeyboardInterrupt as exc:
            return "terminated" if isinstance(exc, Terminated) else "interrupted"
    return None


STORAGE_MODULES = ("sqlalchemy", "optuna.storages")  # code a signal never raises inside (see _Signals)
RECHECK_S = 0.01


class _Signals:
    """Ctrl-C (SIGINT) and SIGTERM inside a trial raise there, so Optuna marks that trial FAIL with the reason
    recorded (it runs again on resume); outside one they ask the loop to stop, and a trial Optuna was creating
    then ends at its start with the same status, so no trial is left RUNNING or failed without a reason.

    A signal that finds the main thread inside a storage call raises only once the call is over (looked at
    again every RECHECK_S by a timer): raised inside SQLAlchemy (in a commit, or as a session closes) it could
    leave a connection checked out with its transaction open, and with SQLite the file locked, so the writes of
    the shutdown itself (the trial's FAIL and reason) would wait on a lock their own process holds."""

    def __init__(self):
        self.stop: type[KeyboardInterrupt] | None = None
        self.inside = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            self.previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_recheck)
        return self

    def __exit__(self, *exc):
        if self.previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        self.stop = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self._on_recheck(signum, frame)

    def _on_recheck(self, _signum, frame):
        if not self.inside or self.stop is None:
            return  # outside a trial the loop stops at its next check
        if _in_storage(frame):
            signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
            return
        raise self.stop

    def wrap(self, fn):
        def guarded(trial):
            self.inside = True
            try:
                self.check()  # a signal while Optuna created this trial
                return fn(trial)
            except KeyboardInterrupt as exc:
                record_signal(trial, exc)
                raise
            finally:
                self.inside = False
        return guarded

    def check(self) -> None:
        if self.stop is not None:
            raise self.stop


def _in_storage(frame) -> bool:
    """Whether the main thread, stopped at frame, is inside a storage call."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


def _run_grid(study: optuna.Study, cfg: RunConfig, guard: _Signals, guarded) -> None:
    sampler: CandidateSampler = study.sampler
    started, count = time.monotonic(), 0
    while (cfg.n_trials is None or count < cfg.n_trials) and \
            (cfg.timeout is None or time.monotonic() - started < cfg.timeout):
        guard.check()
        optuna.storages.fail_stale_trials(study)
        _fail_orphans(study)
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials) or not sampler.is_done(study):
            study.optimize(guarded, n_trials=1, catch=(TrialFailed,))
            count += 1
        elif any(t.state == TrialState.RUNNING for t in trials):
            time.sleep(HEARTBEAT_S)  # another worker's trial, or one a dead process left: wait for heartbeat
        else:
            return


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


def open_records(storage_url: str, study_name: str) -> tuple[optuna.Study, rec.StudyRecords]:
    """A study and its records, for commands that only read (report, best, compare, export): reading needs no
    write access to the database or its folder."""
    study = load_study(open_storage(storage_url, create=False, readonly=True), study_name)
    return study, rec.collect(study, storage_url)


def write_reports(study: optuna.Study, records: rec.StudyRecords, storage_url: str, out_dir: Path) -> list[Path]:
    """The report files, and the study's note and plots for the dashboard (skipped, with a warning, when the
    storage cannot be written)."""
    from compactmind import dashboard, report

    paths = report.write(records, out_dir)
    try:
        dashboard.publish(study, records, storage_url, paths)
    except StorageTrouble as exc:
        log.warning("the dashboard note was not updated (%s)", scrub(str(exc).splitlines()[0], storage_url)[:200])
    return paths


def publish_note(session: Session) -> None:
    """Keep the dashboard's study note current (a worker's trials change it too)."""
    from compactmind import dashboard

    dashboard.publish(session.study, session.records(), session.config.storage)
