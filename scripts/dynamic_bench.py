"""Dynamic compression against uniform and OWL-style allocations, at the size of a uniform level.

For each --at level (e.g. "sparsegpt(sparsity=0.5)"), runs a dynamic study through the CLI (the study file's
levels, its target ratio replaced by that level's uniform ratio less 1e-4, so every profile has the size of the
uniform model, with a few bytes' slack for per-block rounding) and prints, side by side: the uniform profile,
the OWL-style allocation and the best searched profile, each with its selection figure (validation text, what
the search chose on) and its test perplexity (the test windows, never used for selection); the seconds to build
the level database; trials per hour against a static trial of the same method (compressing the model once with
that level plus one evaluation of the test windows, both measured in the same run).

    .venv/bin/python scripts/dynamic_bench.py --study studies/smollm2_dynamic_sparsity.toml \\
        --at "sparsegpt(sparsity=0.5)" --at "sparsegpt(sparsity=0.6)" [--out DIR] [-- extra run flags]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


SLACK = 1e-4  # below the uniform ratio: a level switch moves a few bytes where pruning counts round per block


def level_ratios(study: str, storage: str, extra: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Open (or build) the study's level database in this process: each level's uniform ratio and build
    seconds. The CLI runs below read it back from disk."""
    from compactmind.cli import parse_config
    from compactmind.study.profiles import open_levels
    from compactmind.study.session import candidates_of
    from compactmind.executor import Executor, Progress, load

    class Levels(Progress):
        def level_built(self, done, total, label, how):
            print(f"level {done}/{total} {label}: {how}", flush=True)

    cfg = parse_config(["run", "--study", study, "--storage", storage, *extra])
    loaded, data = load(cfg)
    executor = Executor(loaded, data, cfg.seed, cfg.baseline_bits, progress=Levels())
    db = open_levels(cfg, executor, candidates_of(cfg, loaded.model))
    ratios = {label: lv.ratio for label, lv in zip(db.labels, db.levels)}
    seconds = {label: lv.manifest.get("compress_seconds") for label, lv in zip(db.labels, db.levels)}
    del db, executor, loaded, data
    gc.collect()
    return ratios, seconds


def run_study(study: str, storage: str, name: str, target: float, out: Path, extra: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", "--study", study, "--storage", storage,
           "--study_name", name, "--target_ratio", repr(target), "--output_dir", str(out), *extra]
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    return json.loads((out / "report.json").read_text()), time.perf_counter() - started


def _when(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def summarise(report: dict) -> dict:
    trials = [t for t in report["trials"] if t.get("profile") is not None]
    quality = report["quality"]
    by_kind = {t.get("baseline"): t for t in trials if t.get("baseline") and "duplicate_of" not in t}
    searched = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED") and t.get("started") and t.get("finished")]
    span = (max(_when(t["finished"]) for t in searched) - min(_when(t["started"]) for t in searched)).total_seconds()
    return {"uniform": by_kind.get("uniform"), "owl": by_kind.get("owl"), "best": report["best"], "quality": quality,
            "trials": len(searched), "search_seconds": span, "dense": report["dense"]}


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="studies/smollm2_dynamic_sparsity.toml")
    ap.add_argument("--at", action="append", required=True, help="a level label: its uniform ratio is the target")
    ap.add_argument("--out", default=None, help="folder for the storage and reports (default: a temporary one)")
    args = ap.parse_args(own)
    out = Path(args.out or tempfile.mkdtemp(prefix="dynamic-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out}/bench.db"
    extra = [*extra, "--levels_dir", str(out / "levels")]
    started = time.perf_counter()
    ratios, build = level_ratios(args.study, storage, extra)
    print(f"level database: {len(ratios)} levels, {sum(v or 0 for v in build.values()):.0f} s of compression "
          f"({time.perf_counter() - started:.0f} s with the model load)", flush=True)
    rows = []
    for label in args.at:
        if label not in ratios:
            ap.error(f"{label!r} is not a level of {args.study}; its levels: {', '.join(ratios)}")
        name = "at-" + "".join(c if c.isalnum() else "_" for c in label)
        target = ratios[label] - SLACK
        report, wall = run_study(args.study, storage, name, target, out / name, extra)
        rows.append((label, ratios[label], summarise(report), wall))
    for label, ratio, s, wall in rows:
        q = s["quality"]
        static = (build[label] or 0) + s["dense"]["seconds"]
        per_trial = s["search_seconds"] / max(1, s["trials"])
        print(f"\nat {label}: ratio {ratio:.4f}; dense test perplexity {s['dense']['perplexity']:.3f}; "
              f"selection on {q}")
        print(f"{'':14}{'selection':>12}{'test ppl':>10}{'vs uniform':>12}  profile")
        base = (s["uniform"] or {}).get("perplexity")
        for kind in ("uniform", "owl", "best"):
            t = s[kind] or {}
            test = t.get("perplexity")
            rel = f"{test / base:.3f}x" if test and base else "-"
            print(f"{kind:14}{t.get(q, float('nan')):12.4f}{test if test else float('nan'):10.3f}{rel:>12}  "
                  f"{t.get('pipeline', '-')}")
        print(f"{s['trials']} trials in {s['search_seconds']:.0f} s: {3600 / per_trial:.0f} trials/hour "
              f"({per_trial:.2f} s each) vs a static trial of {label}: {static:.1f} s (compress "
              f"{build[label] or 0:.1f} s + test evaluation {s['dense']['seconds']:.1f} s) -> "
              f"{static / per_trial:.1f}x; the study's wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
