"""Dynamic compression against its baselines, where users compress hardest: the rows of the README's dynamic table.

Each row runs one dynamic study through the CLI (EvoPress's staged search, KL fitness on selection windows of
WikiText-2 validation text, a time budget per row) and prints, side by side, the baselines (uniform, OWL, best of N
random, ShortGPT) and the best searched profile, each with its selection figures (what the search chose on) and
its test perplexity on the WikiText-2 test windows (never used for selection), the gap between the two, the level
database's build seconds, and trials per hour against one static trial of the method (compress once + one test
evaluation, measured in this run).

Rows (--rows, comma-separated):
  gptq3     GPTQ levels 2, 3, 4, 5, 6 bits (g64) per linear, target: uniform W3's ratio; goal <= 0.90x uniform W3
  gptq25    the same levels at an average of 2.5 bits; goal <= 0.75x the best of 32 random profiles
  sparse60  SparseGPT levels 30% to 90% in steps of 5% per linear at uniform 60%'s ratio; goal <= 0.88x uniform
  sparse70  the same at uniform 70%; goals <= 0.70x uniform and below OWL
  depth25   sub-blocks kept or dropped, 25% of the blocks' weights removed; goal <= 0.6x ShortGPT
  embed     GPTQ levels with and without the embedding as a unit, at the same ratios: both fronts in one plot

    .venv/bin/python scripts/dynamic_bench.py --rows gptq3,sparse70 --minutes 25 --out /tmp/dyn [-- run flags]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

BASE = ["--dynamic", "--seq_len", "512", "--max_eval_windows", "16", "--data_samples", "16", "--fitness", "kl",
        "--selection_windows", "16", "--no_hybrids"]
GPTQ = ["--methods", "gptq", "--granularity", "linear"]
SPARSE = ["--methods", "sparsegpt", "--granularity", "linear"]
DEPTH = ["--methods", "dense", "--granularity", "sublayer", "--depth"]
SLACK = 1e-4  # below a uniform ratio: a level switch moves a few bytes where counts round per layer


def gptq(bits: int) -> str:
    """The label of a GPTQ level of the rows' grid (g64, act order: one level per bit width)."""
    return f"gptq(bits={bits}, group_size=64, act_order=True)"


def grids(study: Path, kind: str) -> Path:
    """A study file holding the row's level grid (levels are a method's grid)."""
    text = {"gptq": '[grids.gptq]\nbits = [2, 3, 4, 5, 6]\ngroup_size = [64]\nact_order = [true]\n',
            "sparse": '[grids.sparsegpt]\nsparsity = [' + ", ".join(f"{0.3 + 0.05 * i:.2f}" for i in range(13)) + "]\n",
            "dense": ""}[kind]
    path = study / f"{kind}.toml"
    path.write_text("[run]\n" + text)
    return path


def database(study_file: Path, flags: list[str], storage: str) -> dict:
    """Build (or read) the row's level database in this process: each level's uniform ratio and seconds, and
    the byte share of one decoder block (for depth targets)."""
    from compactmind.cli import parse_config
    from compactmind.dynamic import Profile
    from compactmind.executor import Executor, Progress, load
    from compactmind.study.profiles import open_levels
    from compactmind.study.session import candidates_of

    class Levels(Progress):
        def level_built(self, done, total, label, how):
            print(f"  level {done}/{total} {label}: {how}", flush=True)

    cfg = parse_config(["run", "--study", str(study_file), "--storage", storage, *flags])
    loaded, data = load(cfg)
    executor = Executor(loaded, data, cfg.seed, cfg.baseline_bits, progress=Levels())
    db = open_levels(cfg, executor, candidates_of(cfg, loaded.model))
    dense = executor.reference.dense_bytes
    out = {"ratios": {label: lv.ratio for label, lv in zip(db.labels, db.levels)},
           "seconds": {label: lv.manifest.get("compress_seconds") for label, lv in zip(db.labels, db.levels)},
           "dense_eval_seconds": None}
    if cfg.depth:
        n_blocks = max(u.block for u in db.units) + 1
        drop = [len(o) - 1 for o in db.options]
        quarter = [d if unit.block < round(n_blocks / 4) else 0 for d, unit in zip(drop, db.units)]
        out["depth25"] = 1 - db.bytes_of(Profile(tuple(quarter))) / dense
    started = time.perf_counter()
    executor.restore()
    executor.evaluate(4)
    out["dense_eval_seconds"] = time.perf_counter() - started
    del db, executor, loaded, data
    gc.collect()
    return out


def run(study_file: Path, flags: list[str], storage: str, name: str, target: float, out: Path, minutes: float,
        extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", "--study", str(study_file), *flags, "--storage", storage,
           "--study_name", name, "--target_ratio", repr(round(target, 6)), "--output_dir", str(out),
           "--timeout", str(60 * minutes), "--n_trials", "100000", *extra]
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    report = json.loads((out / "report.json").read_text())
    report["wall_seconds"] = time.perf_counter() - started
    return report


def summary(report: dict) -> dict:
    """The baselines' and the best's figures, and the search's pace."""
    q = report["quality"]
    trials = [t for t in report["trials"] if t.get("profile") is not None and "duplicate_of" not in t]
    rows = {}
    for kind in ("uniform", "owl", "shortgpt"):
        found = [t for t in trials if t.get("baseline") == kind and t["state"] == "COMPLETE"]
        rows[kind] = found[0] if found else None
    randoms = [t for t in trials if t.get("baseline") == "random" and t.get(q) is not None]
    rows["random (best)"] = min(randoms, key=lambda t: t[q]) if randoms else None
    rows["searched (best)"] = report["best"]
    scored = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED") and t.get("duration_seconds")]
    seconds = sum(t["duration_seconds"] for t in scored)
    return {"rows": rows, "quality": q, "trials": len(scored), "seconds": seconds,
            "dense": report["dense"], "randoms": len(randoms)}


def show(name: str, s: dict, static_seconds: float, goal: str) -> list[str]:
    q, dense = s["quality"], s["dense"]
    lines = [f"\n{name}: dense test perplexity {dense['perplexity']:.3f}, selection perplexity "
             f"{dense.get('selection_perplexity', float('nan')):.3f}; goal: {goal}",
             f"{'':16}{q:>14}{'sel. ppl':>10}{'test ppl':>10}{'test/sel':>9}{'ratio':>8}  profile"]
    for kind, t in s["rows"].items():
        if t is None:
            continue
        test, sel = t.get("perplexity"), t.get("selection_perplexity")
        gap = f"{test / sel:.3f}" if test and sel else "-"
        lines.append(f"{kind:16}{t.get(q, float('nan')):>14.4f}{sel or float('nan'):>10.3f}"
                     f"{test or float('nan'):>10.3f}{gap:>9}{t.get('compression_ratio', 0):>8.4f}  "
                     f"{t.get('pipeline', '-')[:90]}")
    per = s["seconds"] / max(1, s["trials"])
    lines.append(f"{s['trials']} trials, {per:.2f} s each: {3600 / per:.0f} trials/hour against a static trial of "
                 f"{static_seconds:.1f} s: {static_seconds / per:.1f}x")
    return lines


def fronts(reports: list[tuple[str, dict]], path: Path) -> None:
    """Selection KL against ratio of every profile scored on all selection windows, with and without the
    embedding as a unit, in one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (suffix, report), color in zip(reports, ("tab:blue", "tab:red")):
        q = report["quality"]
        points = [(t["compression_ratio"], t[q]) for t in report["trials"] if t["state"] == "COMPLETE" and q in t]
        ax.scatter(*zip(*points), s=12, color=color, label="with the embedding as a unit" if suffix else "blocks only")
    ax.set_xlabel("compression ratio (against FP32)")
    ax.set_ylabel(f"{reports[0][1]['quality']} on the selection windows")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SmolLM2, GPTQ levels per linear: with and without the embedding as a unit", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="gptq3,gptq25,sparse60,sparse70,depth25,embed")
    ap.add_argument("--minutes", type=float, default=25.0, help="search time per row")
    ap.add_argument("--out", default="/tmp/dynamic-bench")
    args = ap.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out}/bench.db"
    levels = ["--levels_dir", str(out / "levels")]
    lines, results = [], {}
    dbs: dict[str, dict] = {}
    for row in args.rows.split(","):
        kind = {"gptq3": "gptq", "gptq25": "gptq", "embed": "gptq", "sparse60": "sparse", "sparse70": "sparse",
                "depth25": "dense"}[row]
        flags = BASE + {"gptq": GPTQ, "sparse": SPARSE, "dense": DEPTH}[kind] + levels
        study = grids(out, kind)
        if kind not in dbs:
            started = time.perf_counter()
            print(f"level database for {kind}:", flush=True)
            dbs[kind] = database(study, flags, storage)
            print(f"  ({time.perf_counter() - started:.0f} s with the model load)", flush=True)
        db = dbs[kind]
        r = db["ratios"]
        if row == "gptq3":
            target, goal, label = r[gptq(3)] - SLACK, "<= 0.90x uniform W3", gptq(3)
        elif row in ("gptq25", "embed"):
            target = (r[gptq(2)] + r[gptq(3)]) / 2
            goal = "<= 0.75x the best of 32 random profiles" if row == "gptq25" else "a front no profile without " \
                "the embedding as a unit reaches"
            label = gptq(3)
        elif row.startswith("sparse"):
            label = f"sparsegpt(sparsity=0.{row[-2]})"
            target, goal = r[label] - SLACK, "<= 0.88x uniform" if row == "sparse60" else "<= 0.70x uniform, below OWL"
        else:
            target, goal, label = db["depth25"] - SLACK, "<= 0.6x ShortGPT", "dense"
        more = ["--random_profiles", "32"] if row == "gptq25" else []
        static = (db["seconds"].get(label) or 0) + db["dense_eval_seconds"]
        reports = [("", run(study, flags, storage, row, target, out / row, args.minutes, more + extra))]
        if row == "embed":
            reports.append((" + embedding unit", run(study, flags + ["--embedding_units"], storage, row + "-units",
                                                     target, out / (row + "-units"), args.minutes, extra)))
        if row == "embed":
            fronts(reports, out / "embedding_fronts.png")
        for suffix, report in reports:
            s = summary(report)
            results[row + suffix] = {"target": target, "goal": goal, **{k: v for k, v in s.items() if k != "dense"}}
            lines += show(row + suffix, s, static, goal)
        print("\n".join(lines[-12:]), flush=True)
    print("\n".join(lines))
    (out / "dynamic_bench.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
