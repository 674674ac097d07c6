"""A dynamic study's own steps: its level database and search space, the baselines every such study measures
first (the uniform profile at the target; OWL's allocation for pruning levels; ShortGPT's for depth pruning; the
best of N random profiles where no uniform level hits the target), and the final measurement of the chosen
profiles on the test windows.

Selection happens on validation text; at the end the best profile, the Pareto front and the baselines are
measured on the test windows, and those figures are kept in the study (one study attribute per trial,
`compactmind:test:N`: a finished trial's own attributes cannot change), so reports show both figures and the
gap between them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

from compactmind import allocations, interrupt, llamacpp
from compactmind import pipeline as pl
from compactmind.config import RunConfig
from compactmind.dynamic import LevelDB, open_db
from compactmind.executor import Executor
from compactmind.study.records import (BASELINE_ATTR, TEST_ATTR, baseline_of, best_trial, holds_configuration,
                                       meta_attr, quality_of)
from compactmind.study.spaces import LevelSpace, Schedule, Scorer
from compactmind.study.storage import beside, study_lock

log = logging.getLogger(__name__)

BASELINES = ("uniform", "owl", "shortgpt", "random", "llama.cpp Q4_K_M", "llama.cpp Q3_K_M")
RANDOM_DEFAULT = 8  # random profiles measured where no uniform level hits the target (--random_profiles)
HIT = 0.002  # a uniform profile within this ratio of the target hits it


def levels_root(cfg: RunConfig) -> Path:
    """Where level databases live: --levels_dir, else beside the SQLite file, else storage/levels."""
    return Path(cfg.levels_dir) if cfg.levels_dir else beside(cfg.storage, "levels")


def database_key(cfg: RunConfig, executor: Executor) -> dict:
    """What a level database is made of, by content: the weights, the calibration tokens, the protocol (each
    level's folder adds its text and its methods' versions)."""
    loaded, data = executor.loaded, executor.data
    return {"weights": loaded.fingerprint, "calibration": data.info.get("calib_ids"), "seq_len": data.seq_len,
            "seed": cfg.seed, "dtype": str(loaded.dtype), "device": loaded.device.type,
            "baseline_bits": cfg.baseline_bits}


def open_levels(cfg: RunConfig, executor: Executor, levels: list[pl.Pipeline]) -> LevelDB:
    """The study's level database: read back, or built."""
    return open_db(executor, levels, cfg.granularity, levels_root(cfg), database_key(cfg, executor),
                   executor.progress.level_built, depth=cfg.depth, embeddings=cfg.embedding_units)


def level_space(cfg: RunConfig, executor: Executor, levels: list[pl.Pipeline], study: optuna.Study,
                storage) -> LevelSpace:
    """Open (or build) the level database, record it and its levels in the study, and enqueue the baselines
    (`storage`: the study's RDB storage, whose lock makes two workers starting at once enqueue them once)."""
    db = open_levels(cfg, executor, levels)
    schedule = Schedule.of(cfg.stages, cfg.offspring, len(db.units), cfg.selection_windows, cfg.seed) \
        if cfg.strategy == "evopress" else None
    space = LevelSpace(db, cfg.granularity, cfg.target_ratio, executor.reference.dense_bytes, cfg.quality, schedule)
    if meta_attr("dynamic") not in study.user_attrs:
        study.set_user_attr(meta_attr("dynamic"), {
            "levels": db.labels, "level_ratios": [lv.ratio for lv in db.levels], "units": space.names,
            "options": [db.option_labels(u) for u in range(len(db.units))], "rest_from": db.rest_from,
            "level_seconds": [lv.manifest.get("compress_seconds") for lv in db.levels],
            "database": str(db.folder), "schedule": None if schedule is None else
            {"offspring": schedule.offspring, "stages": [list(s) for s in schedule.stages], "pool": schedule.pool}})
    with study_lock(storage, study.study_name):
        _enqueue_baselines(study, space, executor, cfg)
    return space


def baselines(space: LevelSpace, executor: Executor, cfg: RunConfig) -> list[tuple[str, object]]:
    """(kind, profile) of every baseline this study measures."""
    db = space.db
    uniform = space.uniform()
    if uniform is None:
        log.warning("no uniform profile meets the target ratio %s, not even the most compressing one",
                    space.target_ratio)
    out = [("uniform", uniform)] if uniform is not None else []
    executor.restore()
    calib = executor.data.calib
    if any(lv.manifest.get("sparsity", 0) > 0 for lv in db.levels):
        out.append(("owl", allocations.owl_profile(db, allocations.outlier_ratios(executor.model, calib),
                                                   space.feasible)))
    if db.depth:
        out.append(("shortgpt", allocations.shortgpt_profile(
            db, allocations.block_importance(executor.model, calib), space.feasible)))
    out += [(f"llama.cpp {recipe}", recipe_profile(db, recipe)) for recipe in llamacpp.RECIPES[:2]]
    hit = uniform is not None and 1 - db.bytes_of(uniform) / space.dense_bytes < space.target_ratio + HIT
    n = cfg.random_profiles if cfg.random_profiles is not None else (0 if hit else RANDOM_DEFAULT)
    out += [("random", p) for p in allocations.random_profiles(db, space.feasible, n, cfg.seed)]
    return [(kind, p) for kind, p in out if p is not None and (kind == "uniform" or space.feasible(p))]


def recipe_profile(db: LevelDB, recipe: str):
    """llama.cpp's `recipe` (Q4_K_M, Q3_K_M) as a profile of GGUF levels: every unit at the level that stores it
    in the type the recipe picks for it; None unless the levels are GGUF types holding every such choice."""
    from compactmind.dynamic import Profile

    n_layers = max(u.block for u in db.units) + 1
    levels = []
    for u, unit in enumerate(db.units):
        weight = f"{unit.path}.weight"
        if unit.kind == "embedding":  # a tied embedding is llama.cpp's output tensor
            role = "token_embd" if unit.name == "embed" and _untied(db) else "output"
        elif unit.kind == "linear":
            role = llamacpp.HF_ROLES.get(unit.path.split(".", 3)[-1])
        else:
            return None
        stored = [_stored_type(db, u, i, weight) for i in range(len(db.options[u]))]
        cols = db._pristine[unit.path].weight.shape[1]
        want = llamacpp.recipe_type(recipe, role, unit.block, n_layers, cols) if role != "token_embd" else \
            llamacpp.fitting("Q3_K" if recipe == "Q3_K_M" else "Q4_K", cols)
        if want not in stored:
            return None
        levels.append(stored.index(want))
    return Profile(tuple(levels))


def _untied(db: LevelDB) -> bool:
    return any(unit.name == "head" for unit in db.units)


def _stored_type(db: LevelDB, u: int, i: int, weight: str) -> str | None:
    """The ggml type a unit's weight has at option i."""
    label = db.options[u][i].label
    if db.units[u].kind == "embedding":
        return label.rsplit(": ", 1)[-1]
    if i < len(db.levels):
        return db.levels[i].params[weight]["ledger"].get("ggml")
    return None


def _enqueue_baselines(study: optuna.Study, space: LevelSpace, executor: Executor, cfg: RunConfig) -> None:
    """Enqueue the baselines the study does not hold yet (all of them the first time): one that ended FAIL
    (terminated, interrupted; a killed one has a WAITING retry) is not held, and runs again."""
    held, lost = set(), set()
    for t in study.get_trials(deepcopy=False):
        if baseline_of(t):
            params = t.params or t.system_attrs.get("fixed_params") or {}  # a WAITING one has its fixed params
            key = (baseline_of(t), tuple(params.get(n) for n in space.names))
            (held if holds_configuration(t.state, t.user_attrs.get("status")) else lost).add(key)
    if held and not lost - held:
        return
    for kind, profile in baselines(space, executor, cfg):
        if (kind, profile.levels) not in held:
            study.enqueue_trial(dict(zip(space.names, profile.levels)), user_attrs={BASELINE_ATTR: kind})


def finalize(study: optuna.Study, space: LevelSpace, executor: Executor, batch_size: int) -> list[int]:
    """Measure the chosen profiles on the test windows (once each): the best, the Pareto front, the baselines.
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
    """The trials a dynamic study reports on the test windows: its baselines (of the random ones, the best), its
    best, its Pareto front."""
    quality = quality_of(study)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if all(n in t.params for n in space.names) and "duplicate_of" not in t.user_attrs]
    picks = {t.number: t for t in complete if baseline_of(t) in BASELINES and baseline_of(t) != "random"}
    for t in (best_trial([t for t in complete if baseline_of(t) == "random"], quality),
              best_trial(complete, quality)):
        if t is not None:
            picks[t.number] = t
    if best_trial(complete, quality) is not None:
        picks.update({t.number: t for t in study.best_trials if "duplicate_of" not in t.user_attrs})
    return [picks[n] for n in sorted(picks)]
