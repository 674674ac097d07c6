"""A study's life: create it or resume it (refusing one made with other settings), measure the dense baseline
once, run trials until the grid or the budget is done (here and in other workers), and write its reports.

A study stores its identity (model, data, protocol, target, objectives, search space) and its settings
(`RunConfig.to_dict(study_only=True)`); a worker rebuilds its RunConfig from them with `from_dict`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from compactmind import identity as ident
from compactmind import interrupt
from compactmind import pipeline as pl
from compactmind.config import LOCAL_FIELDS, RunConfig
from compactmind.objectives import OBJECTIVES
from compactmind.errors import ConfigError, StorageError
from compactmind.data import Dataset
from compactmind.models import LoadedModel
from compactmind.study import records as rec
from compactmind.study import profiles
from compactmind.study.liveness import Beating, fail_lost_trials
from compactmind.study.objective import TrialSetup, TrialFailed, TrialLost, lost, objective, record_signal
from compactmind.study.records import meta_attr, study_meta
from compactmind.study.sampler import STRATEGIES, CandidateSampler
from compactmind.study.spaces import LevelSpace, Scorer, PipelineSpace
from compactmind.study.storage import (HEARTBEAT_S, StorageTrouble, check_storage, load_study, open_storage,
                                       reachable, safe_url, scrub, study_lock, study_names)
from compactmind.executor import SILENT, Executor, Progress, load

log = logging.getLogger(__name__)


def study_identity(loaded: LoadedModel, data: Dataset, cfg: RunConfig, candidates: list[pl.Pipeline]) -> dict:
    return ident.identity_of(loaded, data, cfg, candidates)


def check_identity(study: optuna.Study, identity: dict) -> None:
    """Refuse a study made with other content, settings or code than this run's, naming what changed."""
    ident.check(study_meta(study.user_attrs).get("identity"), identity, study.study_name)


def create_or_resume(storage, name: str, identity: dict, about: dict, cfg: RunConfig) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists and matches; a different study under the name is refused.
    One process at a time (study_lock), so two runs racing to create one name never both describe it: the
    second finds the first's identity and is refused if it differs. `about` (paths, labels) is recorded for
    reports but never compared."""
    with study_lock(storage, name):
        if name in study_names(storage):
            study = optuna.load_study(study_name=name, storage=storage)
            check_identity(study, identity)
            if "identity" not in study_meta(study.user_attrs):  # its creator died before describing it
                _describe(study, identity, about, cfg)
            return study, True
        directions = [OBJECTIVES[o] for o in cfg.objectives]
        study = optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=True)
        _describe(study, identity, about, cfg)
        return study, False


def _describe(study: optuna.Study, identity: dict, about: dict, cfg: RunConfig) -> None:
    study.set_metric_names(list(cfg.objectives))
    study.set_user_attr(meta_attr("about"), about)
    study.set_user_attr(meta_attr("config"), cfg.to_dict(study_only=True))
    study.set_user_attr(meta_attr("identity"), identity)  # last: a study with its identity is whole


def stored_config(study: optuna.Study) -> dict:
    """The settings the study was created with (what a worker needs to join it)."""
    config = study_meta(study.user_attrs).get("config")
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
    selection = executor.data.selection
    known = study_meta(study.user_attrs).get("dense")
    if known and (selection is None or "selection_perplexity" in known):
        return known, False
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
    study.set_user_attr(meta_attr("dense"), dense)
    return dense, True


@dataclass
class Opened:
    """A study created or resumed, with the model and data it was made on."""

    study: optuna.Study
    config: RunConfig
    loaded: LoadedModel
    data: Dataset
    candidates: list[pl.Pipeline]
    resumed: bool
    storage: optuna.storages.RDBStorage


@dataclass
class Session:
    """An open study with its model, data and search space, ready to run trials."""

    study: optuna.Study
    config: RunConfig
    executor: Executor
    space: PipelineSpace | LevelSpace
    measure: Scorer
    dense: dict

    @property
    def size(self) -> int | None:
        """How many configurations an exhaustive strategy runs (None: the space is searched to a budget)."""
        return len(self.space.candidates) if STRATEGIES[self.config.strategy].exhaustive else None

    def records(self) -> rec.StudyRecords:
        return rec.collect(self.study, self.config.storage)


def candidates_of(cfg: RunConfig, model=None) -> list[pl.Pipeline]:
    """The study's candidates (a dynamic study's levels); given the model, those that do the same to it as an
    earlier one are left out (one line; -v lists them)."""
    if cfg.dynamic and cfg.methods == ("dense",):  # depth pruning alone: every unit kept as it is, or dropped
        return [pl.Pipeline(())]
    candidates = pl.candidates(list(cfg.methods) if cfg.methods else None, cfg.hybrids, cfg.grids)
    if not candidates:
        raise ConfigError("No candidate pipelines: --methods names no method; pass at least one.")
    if model is None:
        return candidates
    candidates, dropped = pl.distinct(model, candidates)
    for same, kept in dropped:
        log.debug("%s does the same to this model as %s: searched once", same, kept)
    if dropped:
        log.info("%d candidates do the same to this model as another one and are searched once (-vv lists them)",
                 len(dropped))
    return candidates


def open_study(cfg: RunConfig) -> Opened:
    """Load model and data, then create the study or resume it (refusing one made with other settings)."""
    candidates_of(cfg)  # bad methods or grids fail before a long model load
    check_storage(cfg.storage)  # likewise, and nothing is created yet
    reachable(cfg.storage)
    loaded, data = load(cfg)
    interrupt.checkpoint()
    candidates = candidates_of(cfg, loaded.model)
    storage = open_storage(cfg.storage)
    identity = study_identity(loaded, data, cfg, candidates)
    about = {"model": {**identity["model"], "source": loaded.source,
                       **({"source_gguf": loaded.source_info["path"]} if "path" in (loaded.source_info or {}) else {})},
             "data": data.info,
             "candidates": [str(c) for c in candidates]}
    name = cfg.study_name or ident.default_name(identity)
    study, resumed = create_or_resume(storage, name, identity, about, cfg)
    what = f"{len(candidates)} levels per {cfg.granularity}" if cfg.dynamic else \
        f"{len(candidates)} candidates ({sum(c.is_hybrid for c in candidates)} hybrid)"
    log.info("%s study %r in %s: %s, target ratio %s", "resuming" if resumed else "new", name,
             safe_url(cfg.storage), what, cfg.target_ratio)
    return Opened(study, cfg, loaded, data, candidates, resumed, storage)


def start(opened: Opened, progress: Progress = SILENT) -> Session:
    """Scorer (or read) the dense baseline and build the search space; a dynamic study also opens its level
    database and enqueues its baselines. `progress` hears about every long step."""
    cfg, study, data = opened.config, opened.study, opened.data
    interrupt.checkpoint()
    executor = Executor(opened.loaded, data, cfg.seed, cfg.baseline_bits, progress=progress)
    dense, measured = dense_baseline(study, executor, cfg.batch_size)
    log.info("dense perplexity %.4f (%d windows; %s)", dense["perplexity"], dense["windows"],
             f"measured in {dense['seconds']:.1f} s" if measured else "read from the study")
    if cfg.dynamic:
        space = profiles.level_space(cfg, executor, opened.candidates, study, opened.storage)
        measure = Scorer(cfg.quality, data.selection, "selection_", dense)
        measure.prepare(executor)
    else:
        space = PipelineSpace(opened.candidates, pl.search_spaces(cfg.methods, cfg.grids))
        measure = Scorer("perplexity", data.windows, "", dense)
    return Session(study, cfg, executor, space, measure, dense)


def open_session(cfg: RunConfig, progress: Progress = SILENT) -> Session:
    return start(open_study(cfg), progress)


def run_trials(session: Session) -> None:
    """Run trials until the grid is done (here or by other workers) or the budget (--n_trials/--timeout) is
    spent; a dynamic study then measures its chosen profiles on the test windows. A signal takes effect at the
    next checkpoint (interrupt.Interrupted): a trial running then is failed with that reason and runs again when
    the study resumes. Trials left RUNNING by dead workers are failed and retried (liveness.fail_lost_trials)."""
    cfg, study = session.config, session.study
    ctx = TrialSetup(session.executor, cfg, session.space, session.measure, session.dense)
    strategy = STRATEGIES[cfg.strategy]
    sampler = Beating(strategy.make(session.space, cfg.seed))
    study.sampler = sampler
    try:
        if isinstance(sampler.inner, CandidateSampler):
            _run_grid(study, cfg, ctx, sampler.inner)
        else:
            _run_budget(study, cfg, ctx, None if cfg.timeout or strategy.exhaustive else 100)
    finally:
        sampler.end()
    interrupt.checkpoint()
    if cfg.dynamic:
        profiles.finalize(study, session.space, session.executor, cfg.batch_size)


def _guarded(ctx: TrialSetup, ran: list):
    """The objective as Optuna calls it: `ran` collects its trials; a signal that took effect inside the trial
    (at one of its checkpoints) is recorded on it before Optuna fails it."""
    def guarded(trial: optuna.Trial):
        ran.append(trial)
        try:
            interrupt.checkpoint()  # a signal while Optuna created this trial
            return objective(ctx, trial)
        except interrupt.Interrupted as stop:
            record_signal(trial, stop)
            raise
    return guarded


def _optimize(study: optuna.Study, ctx: TrialSetup, ran: list, **kwargs) -> bool:
    """study.optimize; True when it stopped on a trial another worker failed under this one, which this worker
    drops, saying so in one line, and goes on."""
    try:
        study.optimize(_guarded(ctx, ran), catch=(TrialFailed, TrialLost), **kwargs)
        return False
    except Exception as exc:
        trial_id = getattr(study.sampler, "trial_id", None)  # Beating's: the trial this process took last
        if trial_id is None or not _refused_as_finished(exc) or \
                study._storage.get_trial(trial_id).state == TrialState.RUNNING:
            raise
        log.warning("%s", lost(study.sampler.trial_number))
        return True


def _refused_as_finished(exc: BaseException | None) -> bool:
    """Whether Optuna refused to write a trial because it had finished: its tell's "Cannot tell a FAIL trial",
    or a write that found it finished (as it was taken or told). Optuna may raise another error over it (an
    AssertionError in its own bookkeeping when the tell found the trial failed), so the chain is read."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError) or \
                (isinstance(exc, ValueError) and str(exc).startswith("Cannot tell")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _run_grid(study: optuna.Study, cfg: RunConfig, ctx: TrialSetup, sampler: CandidateSampler) -> None:
    started, ran = time.monotonic(), []
    while (cfg.n_trials is None or len(ran) < cfg.n_trials) and \
            (cfg.timeout is None or time.monotonic() - started < cfg.timeout):
        interrupt.checkpoint()
        fail_lost_trials(study)
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials) or not sampler.is_done(study):
            _optimize(study, ctx, ran, n_trials=1)
        elif any(t.state == TrialState.RUNNING for t in trials):
            time.sleep(HEARTBEAT_S)  # another worker's trial, or one a dead process left: wait for it
        else:
            return


def _run_budget(study: optuna.Study, cfg: RunConfig, ctx: TrialSetup, default: int | None) -> None:
    """An Optuna sampler to the budget (an exhaustive one until it stops the study itself); between trials,
    lost trials are failed and a recorded signal stops the loop."""
    def between(study, _trial):
        fail_lost_trials(study)
        if interrupt.pending():
            study.stop()

    started, ran = time.monotonic(), []
    budget = cfg.n_trials or default
    fail_lost_trials(study)
    while True:
        left = None if budget is None else budget - len(ran)
        timeout = None if cfg.timeout is None else cfg.timeout - (time.monotonic() - started)
        if (left is not None and left <= 0) or (timeout is not None and timeout <= 0):
            return
        if not _optimize(study, ctx, ran, n_trials=left, timeout=timeout, callbacks=[between]):
            return  # the budget, the timeout, a signal, or an exhausted sampler ended it


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


def records_of(study: optuna.Study, storage_url: str) -> rec.StudyRecords:
    return rec.collect(study, storage_url)


def publish(study: optuna.Study, records: rec.StudyRecords, storage_url: str) -> None:
    """Keep the dashboard's study note current (a worker's trials change it too)."""
    from compactmind import dashboard

    dashboard.publish(study, records, storage_url)
