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
from compactmind.study.objective import Context, objective
from compactmind.study.records import STUDY_ATTR
from compactmind.study.sampler import STRATEGIES, CandidateSampler
from compactmind.study.storage import (GRACE_S, HEARTBEAT_S, check_storage, load_study, open_storage, safe_url,
                                       study_names)
from compactmind.trial import Executor, load

log = logging.getLogger(__name__)


def fingerprint(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def study_identity(loaded: LoadedModel, data: Dataset, cfg: RunConfig, candidates: list[pl.Pipeline]) -> dict:
    n_params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "model": {"name": loaded.name, "source": loaded.source, "parameters": n_params},
        "data": data.info,
        "protocol": {"seq_len": data.seq_len, "windows": data.info["windows"], "dtype": str(loaded.dtype)[6:],
                     "data_samples": cfg.data_samples, "seed": cfg.seed, "baseline_bits": cfg.baseline_bits},
        "target_ratio": cfg.target_ratio,
        "objectives": list(cfg.objectives),
        "search_space": fingerprint([str(c) for c in candidates]),
    }


def default_study_name(identity: dict) -> str:
    return f"{identity['model']['name']}-{fingerprint(identity)}"


def _difference(key: str, stored, now) -> str:
    def shown(v):
        return ", ".join(map(str, v)) if isinstance(v, list) else str(v)

    if isinstance(now, (list, str, int, float)) and isinstance(stored, (list, str, int, float)):
        return f"{key} (the study: {shown(stored)}; this run: {shown(now)})"
    return key


def create_or_resume(storage, name: str, identity: dict, cfg: RunConfig) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists and matches; a different study under the name is refused."""
    if name in study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        stored = study.user_attrs.get(STUDY_ATTR, {}).get("identity")
        if stored is not None and fingerprint(stored) != fingerprint(identity):
            differs = [_difference(k, stored.get(k), identity[k]) for k in identity
                       if fingerprint(identity[k]) != fingerprint(stored.get(k))]
            raise StorageError(f"Study {name!r} was made with a different {'; '.join(differs)}; pass a new "
                               "--study_name (or leave it out to get one keyed by these settings).")
        if stored is None:  # the creating process died before it could write the study's settings
            _describe(study, identity, cfg)
        return study, True
    directions = [OBJECTIVES[o] for o in cfg.objectives]
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=True)
    _describe(study, identity, cfg)
    return study, False


def _describe(study: optuna.Study, identity: dict, cfg: RunConfig) -> None:
    study.set_metric_names(list(cfg.objectives))
    meta = dict(study.user_attrs.get(STUDY_ATTR, {}))
    meta.update(identity=identity, config=cfg.to_dict(study_only=True))
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
    """The dense model's perplexity, measured once per study and kept in the study; (figures, measured now)."""
    meta = dict(study.user_attrs.get(STUDY_ATTR, {}))
    if "dense" in meta:
        return meta["dense"], False
    executor.restore()
    result = executor.evaluate(batch_size)
    meta["dense"] = {"perplexity": result.perplexity, "windows": result.windows, "tokens": result.tokens,
                     "seconds": result.seconds, "compression_ratio": 0.0,
                     "dtype": str(executor.loaded.dtype).replace("torch.", ""),
                     "window_nll": [round(x, 4) for x in result.window_nll]}
    study.set_user_attr(STUDY_ATTR, meta)
    return meta["dense"], True


@dataclass
class Session:
    """An open study with its model, data and candidates, ready to run trials."""

    study: optuna.Study
    config: RunConfig
    executor: Executor
    candidates: list[pl.Pipeline]
    dense: dict
    resumed: bool
    dense_measured: bool

    def records(self) -> rec.StudyRecords:
        return rec.collect(self.study, self.config.storage)


def candidates_of(cfg: RunConfig) -> list[pl.Pipeline]:
    candidates = pl.candidates(list(cfg.methods) if cfg.methods else None, cfg.hybrids, cfg.grids)
    if not candidates:
        raise ConfigError("No candidate pipelines: --methods names no method; pass at least one.")
    return candidates


def open_session(cfg: RunConfig) -> Session:
    """Load model and data, then create the study or resume it (refusing one made with other settings)."""
    candidates = candidates_of(cfg)
    check_storage(cfg.storage)  # fail before a long model load, and create nothing yet
    loaded, data = load(cfg)
    storage = open_storage(cfg.storage)
    identity = study_identity(loaded, data, cfg, candidates)
    name = cfg.study_name or default_study_name(identity)
    study, resumed = create_or_resume(storage, name, identity, cfg)
    log.info("%s study %r in %s: %d candidates (%d single, %d hybrid), target ratio %s",
             "resuming" if resumed else "new", name, safe_url(cfg.storage), len(candidates), sum(not c.is_hybrid for c in candidates), sum(c.is_hybrid for c in candidates),
             cfg.target_ratio)
    executor = Executor(loaded, data, cfg.seed, cfg.baseline_bits)
    dense, measured = dense_baseline(study, executor, cfg.batch_size)
    log.info("dense perplexity %.4f (%d windows; %s)", dense["perplexity"], dense["windows"],
             f"measured in {dense['seconds']:.1f} s" if measured else "read from the study")
    return Session(study, cfg, executor, candidates, dense, resumed, measured)


def run_trials(session: Session, on_trial: Callable[[dict], None] | None = None,
               on_window: Callable[[int, int], None] | None = None) -> bool:
    """Run trials until the grid is done (here or by other workers) or the budget (--n_trials/--timeout) is
    spent; returns True when interrupted by Ctrl-C. Trials left RUNNING by dead workers are failed by the
    heartbeat and retried."""
    cfg, study = session.config, session.study
    ctx = Context(session.executor, cfg, session.candidates, pl.search_spaces(cfg.methods, cfg.grids),
                  session.dense, on_trial, on_window)
    strategy = STRATEGIES[cfg.strategy]
    study.sampler = strategy.make(session.candidates, cfg.seed)
    guard = _Interrupts()
    with guard:
        try:
            if isinstance(study.sampler, CandidateSampler):
                _run_grid(study, cfg, guard, guard.wrap(lambda trial: objective(ctx, trial)))
            else:
                budget = cfg.n_trials or (None if cfg.timeout or strategy.exhaustive else 100)
                study.optimize(guard.wrap(lambda trial: objective(ctx, trial)), n_trials=budget,
                               timeout=cfg.timeout, catch=(Exception,))
        except KeyboardInterrupt:
            return True
    return False


class _Interrupts:
    """Ctrl-C inside a trial raises there, so Optuna marks that trial FAIL (it is re-run on resume); outside
    one (while a trial is being created) it only asks the loop to stop, so no trial is left RUNNING."""

    def __init__(self):
        self.stop = self.inside = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _on_sigint(self, _signum, _frame):
        self.stop = True
        if self.inside:
            raise KeyboardInterrupt

    def wrap(self, fn):
        def guarded(trial):
            if self.stop:
                raise KeyboardInterrupt
            self.inside = True
            try:
                return fn(trial)
            finally:
                self.inside = False
        return guarded

    def check(self) -> None:
        if self.stop:
            raise KeyboardInterrupt


def _run_grid(study: optuna.Study, cfg: RunConfig, guard: _Interrupts, guarded) -> None:
    sampler: CandidateSampler = study.sampler
    started, count = time.monotonic(), 0
    while (cfg.n_trials is None or count < cfg.n_trials) and \
            (cfg.timeout is None or time.monotonic() - started < cfg.timeout):
        guard.check()
        optuna.storages.fail_stale_trials(study)
        _fail_orphans(study)
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials) or not sampler.is_done(study):
            study.optimize(guarded, n_trials=1, catch=(Exception,))
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
    """A study and its records, for commands that only read (report, best, compare, export)."""
    study = load_study(open_storage(storage_url, create=False), study_name)
    return study, rec.collect(study, storage_url)


def write_reports(study: optuna.Study, records: rec.StudyRecords, storage_url: str, out_dir: Path) -> list[Path]:
    from compactmind import dashboard, report

    paths = report.write(records, out_dir)
    dashboard.publish(study, records, storage_url, paths)
    return paths
