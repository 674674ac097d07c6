"""Early stopping on a grid: evaluation time saved, and whether the Pareto front stays the same.

Runs the same grid study twice through the CLI, with early stopping (the default) and with --no_early_stop,
in two fresh SQLite files, then prints the evaluation seconds and windows of each run and compares the two
Pareto fronts (configurations and figures).

    .venv/bin/python scripts/early_stop_bench.py --study studies/demo.toml [extra run flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(study: str, extra: list[str], folder: Path, name: str, flags: list[str]) -> tuple[dict, float]:
    out = folder / name
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", "--study", study, "--study_name", name,
           "--storage", f"sqlite:///{folder}/{name}.db", "--output_dir", str(out), *flags, *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return json.loads((out / "report.json").read_text()), time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="studies/demo.toml")
    args, extra = ap.parse_known_args()
    folder = Path(tempfile.mkdtemp(prefix="early-stop-"))
    results = {}
    for name, flags in (("with", []), ("without", ["--no_early_stop"])):
        report, wall = run(args.study, extra, folder, name, flags)
        trials = report["trials"]
        results[name] = report
        evaluated = [t for t in trials if t.get("eval_seconds")]
        print(f"{name:>8} early stopping: wall {wall:7.1f} s, evaluation {sum(t['eval_seconds'] for t in evaluated):7.1f} s, "
              f"{sum(t.get('windows') or 0 for t in trials)} windows, "
              f"{sum(t.get('status') == 'early_stopped' for t in trials)} candidates stopped early", flush=True)
    fronts = {k: [(t["pipeline"], round(t["perplexity"], 6), round(t["compression_ratio"], 6))
                  for t in r["pareto_front"]] for k, r in results.items()}
    same = fronts["with"] == fronts["without"]
    saved = 1 - sum(t.get("eval_seconds") or 0 for t in results["with"]["trials"]) / \
        max(1e-9, sum(t.get("eval_seconds") or 0 for t in results["without"]["trials"]))
    print(f"evaluation time saved: {saved:.0%}; Pareto front identical: {same}")
    for label, ppl, ratio in fronts["with"]:
        print(f"  ratio {ratio:.4f}  perplexity {ppl:.4f}  {label}")
    if not same:
        print("without early stopping the front is:")
        for label, ppl, ratio in fronts["without"]:
            print(f"  ratio {ratio:.4f}  perplexity {ppl:.4f}  {label}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
