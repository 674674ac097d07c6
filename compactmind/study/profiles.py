"""A dynamic study's own steps: its level database and search space, the baselines every such study measures
(the uniform profile at the target and an OWL-style allocation, enqueued as its first trials), and the final
measurement of the chosen profiles on the test windows.

Selection happens on validation text; at the end the best profile, the Pareto front and the two baselines are
measured on the test windows, and those figures are kept in the study (one study attribute per trial,
`compactmind:test:N`: a finished trial's own attributes cannot change), so reports show both figures.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

from compactmind import interrupt
from compactmind import pipeline as pl
from compactmind.config import RunConfig
from compactmind.dynamic import LevelDB, open_db, outlier_ratios, owl_profile
from compactmind.study.records import (BASELINE_ATTR, TEST_ATTR, baseline_of, best_trial, holds_configuration,
                                       meta_attr, quality_of)
from compactmind.study.spaces import LevelSpace, Scorer
from compactmind.study.storage import beside, study_lock
from compactmind.executor import Executor

log = logging.getLogger(__name__)

BASELINES = ("uniform", "owl")


def levels_root(cfg: RunConfig) -> Path:
    """Where level databases live: --levels_dir, else beside the SQLite file, else storage/levels."""
    return Path(cfg.levels_dir) if cfg.levels_dir else beside(cfg.storage, "levels")


def open_levels(cfg: RunConfig, executor: Executor, levels: list[pl.Pipeline]) -> LevelDB:
    """The study's level database, keyed by model, calibration data and protocol: read back, or built."""
    loaded, data = executor.loaded, executor.data
    key = {"model": [loaded.name, loaded.source, sum(p.numel() for p in loaded.model.parameters())],
           "calibration": [data.info["calib_source"], data.info["calib_tokens"], data.seq_len, cfg.seed],
           "dtype": str(loaded.dtype), "device": loaded.device.type,
           "baseline_bits": cfg.baseline_bits}
    return open_db(executor, levels, cfg.granularity, levels_root(cfg), key, executor.progress.level_built)


def level_space(cfg: RunConfig, executor: Executor, levels: list[pl.Pipeline], study: optuna.Study,
                storage) -> LevelSpace:
    """Open (or build) the level database, record its levels in the study, and enqueue the baselines
    (`storage`: the study's RDB storage, whose lock makes two workers starting at once enqueue them once)."""
    db = open_levels(cfg, executor, levels)
    space = LevelSpace(db, cfg.granularity, cfg.target_ratio, executor.reference.dense_bytes, cfg.quality)
    if meta_attr("dynamic") not in study.user_attrs:
        study.set_user_attr(meta_attr("dynamic"), {
            "levels": db.labels, "level_ratios": [lv.ratio for lv in db.levels], "units": space.names,
            "rest_from": db.rest_from, "level_seconds": [lv.manifest.get("compress_seconds") for lv in db.levels]})
    with study_lock(storage, study.study_name):
        _enqueue_baselines(study, space, executor)
    return space


def _enqueue_baselines(study: optuna.Study, space: LevelSpace, executor: Executor) -> None:
    """Enqueue the baselines the study does not hold yet: one that ended FAIL (terminated, interrupted; a killed
    one has a WAITING retry) is not held, and runs again."""
    present = {baseline_of(t) for t in study.get_trials(deepcopy=False)
               if holds_configuration(t.state, t.user_attrs.get("status"))}
    if set(BASELINES) <= present:
        return
    uniform = space.uniform()
    if uniform is None:
        log.warning("no level meets the target ratio %s: not even the most compressing one", space.target_ratio)
        return
    executor.restore()
    owl = owl_profile(space.db, outlier_ratios(executor.model, executor.data.calib, space.db.units), space.feasible)
    for kind, profile in (("uniform", uniform), ("owl", owl)):
        if kind not in present and profile is not None:
            study.enqueue_trial(dict(zip(space.names, profile.levels)), user_attrs={BASELINE_ATTR: kind})


def finalize(study: optuna.Study, space: LevelSpace, executor: Executor, batch_size: int) -> list[int]:
    """Scorer the chosen profiles on the test windows (once each): the best, the Pareto front, the baselines.
    Returns the trial numbers measured now."""
    test = Scorer("perplexity", executor.data.windows, "", None)
    done = []
    for t in chosen(study, space):
        if f"{TEST_ATTR}{t.number}" in study.user_attrs:
            continue
        interrupt.checkpoint()
        compressed = executor.assemble(space.db, LevelSpace.profile_of(t.params, space.names))
        result = test.score(executor, batch_size)
        study.set_user_attr(f"{TEST_ATTR}{t.number}", test.attrs(result))
        log.info("trial %d on the test windows: perplexity %.4f (ratio %.4f, %s)", t.number, result.value,
                 compressed.footprint.compression_ratio, baseline_of(t) or "searched")
        done.append(t.number)
    return done


def chosen(study: optuna.Study, space: LevelSpace) -> list[optuna.trial.FrozenTrial]:
    """The trials a dynamic study reports on the test windows: its baselines, its best, its Pareto front."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if all(n in t.params for n in space.names) and "duplicate_of" not in t.user_attrs]
    picks = {t.number: t for t in complete if baseline_of(t) in BASELINES}
    best = best_trial(complete, quality_of(study))
    if best is not None:
        picks[best.number] = best
        picks.update({t.number: t for t in study.best_trials if "duplicate_of" not in t.user_attrs})
    return [picks[n] for n in sorted(picks)]

