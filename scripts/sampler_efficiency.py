"""Sampler efficiency: replay each search strategy on a recorded grid and measure the hypervolume it reaches.

A finished grid study is the table (every configuration's perplexity and compression ratio, or why it was not
evaluated). Each sampler then runs, for many seeds, on an in-memory study whose objective looks the answer up in
that table instead of compressing a model, so the replay costs seconds. Printed per sampler: the median share of
the grid's hypervolume (perplexity minimized, ratio maximized, feasible points only, reference point = worst
feasible perplexity and the target ratio) reached after 10/20/35/50% of the grid's size in trials, and the median
number of trials needed to reach 95% of it.

    .venv/bin/python scripts/sampler_efficiency.py --study_name demo [--storage URL] [--seeds 20]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings

import optuna

from compactmind import pipeline as pl
from compactmind.config import RunConfig
from compactmind.study.objective import suggest_pipeline
from compactmind.study.sampler import STRATEGIES
from compactmind.study.session import candidates_of, open_records, stored_config


def hypervolume(points: list[tuple[float, float]], ref_ppl: float, target: float) -> float:
    """Area dominated by (perplexity, ratio) points, bounded by perplexity <= ref_ppl and ratio >= target."""
    pts = sorted((p, r) for p, r in points if p <= ref_ppl and r >= target)
    area, best_ratio = 0.0, target
    # sweep by increasing perplexity: each point adds the ratio it gains over the best seen so far
    for i, (p, r) in enumerate(pts):
        if r > best_ratio:
            area += (ref_ppl - p) * (r - best_ratio)
            best_ratio = r
    return area


def load_table(study: optuna.Study):
    table = {}
    for t in study.get_trials(deepcopy=False):
        label = t.user_attrs.get("pipeline")
        if label is None or t.state.name not in ("COMPLETE", "PRUNED") or "duplicate_of" in t.user_attrs:
            continue
        table[label] = (t.user_attrs.get("perplexity") if t.state.name == "COMPLETE" else None,
                        t.user_attrs.get("compression_ratio"),
                        t.constraints.get("target_ratio"))
    return table


def replay(strategy: str, seed: int, table: dict, shapes, spaces, candidates, budget: int) -> list[tuple]:
    study = optuna.create_study(directions=["minimize", "maximize"],
                                sampler=STRATEGIES[strategy].make(candidates, seed))
    found = []

    def objective(trial):
        label = str(suggest_pipeline(trial, shapes, spaces))
        ppl, ratio, constraint = table[label]
        if constraint is not None:
            trial.set_constraint("target_ratio", constraint)
        found.append((ppl, ratio) if ppl is not None and constraint is not None and constraint <= 0 else None)
        if ppl is None:
            raise optuna.TrialPruned()
        return ppl, ratio

    study.optimize(objective, n_trials=budget)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study_name", required=True, help="a finished grid study")
    ap.add_argument("--storage", default="sqlite:///storage/compactmind.db")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--strategies", default="random,qmc,tpe,nsga2,gp")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    study, _ = open_records(args.storage, args.study_name)
    config = RunConfig.from_dict(stored_config(study))
    candidates = candidates_of(config)
    spaces = pl.search_spaces(config.methods, config.grids)
    shapes = list(dict.fromkeys(c.shape for c in candidates))
    table = load_table(study)
    missing = [str(c) for c in candidates if str(c) not in table]
    if missing:
        print(f"the study has not finished its grid: {len(missing)} configurations missing", file=sys.stderr)
        return 1
    target = config.target_ratio
    feasible = [(p, r) for p, r, c in table.values() if p is not None and c is not None and c <= 0]
    ref_ppl = max(p for p, _ in feasible)
    full = hypervolume(feasible, ref_ppl, target)
    n = len(candidates)
    marks = [max(1, round(n * f)) for f in (0.10, 0.20, 0.35, 0.50)]
    print(f"grid: {n} configurations, {len(feasible)} feasible and evaluated; hypervolume {full:.4g} "
          f"(reference: perplexity {ref_ppl:.4g}, ratio {target}); {args.seeds} seeds per sampler")
    print(f"{'sampler':<8} " + " ".join(f"{'HV@' + str(m):>8}" for m in marks) + f" {'trials to 95%':>14}"
          + f" {'(% of grid)':>11}")
    for strategy in args.strategies.split(","):
        seeds = args.seeds if strategy != "gp" else max(3, args.seeds // 4)
        shares = {m: [] for m in marks}
        to95 = []
        for seed in range(seeds):
            found = replay(strategy, seed, table, shapes, spaces, candidates, n)
            reached = None
            for k in range(1, n + 1):
                hv = hypervolume([f for f in found[:k] if f], ref_ppl, target) / full if full else 1.0
                if k in shares:
                    shares[k].append(hv)
                if reached is None and hv >= 0.95:
                    reached = k
            to95.append(reached if reached is not None else n + 1)
        med = statistics.median(to95)
        print(f"{strategy:<8} " + " ".join(f"{statistics.median(shares[m]):>8.1%}" for m in marks)
              + f" {med:>14.1f} {med / n:>11.0%}" + ("" if seeds == args.seeds else f"  ({seeds} seeds)"),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
