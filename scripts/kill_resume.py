"""Fault drill: kill a running study with `kill -9` at random moments, resume it each time, then check it.

    python scripts/kill_resume.py --kills 10 --storage sqlite:///storage/drill.db --study_name drill \
        --output_dir results/drill -- --study studies/demo.toml

Everything after `--` goes to `compactmind run` as it is. Each round starts the run, kills it (SIGKILL: no
cleanup, no report) after a random number of seconds in [--min_s, --max_s], and starts it again; after the last
kill the run is left to finish. Then the study is checked against what it should hold:
- every candidate configuration finished (COMPLETE or PRUNED) exactly once, no other finished configuration;
- no trial is left RUNNING or WAITING;
- report.json lists exactly the storage's trials, with the same states and values.
Prints the rounds and the check, and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def run_once(cmd: list[str], kill_after: float | None, log) -> tuple[int, float]:
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode, time.monotonic() - started


def check(storage_url: str, study_name: str, output_dir: Path) -> list[str]:
    """The problems found; empty when the study is whole."""
    from optuna.trial import TrialState

    from compactmind.study.records import STUDY_ATTR
    from compactmind.study.session import open_records

    study, _ = open_records(storage_url, study_name)
    candidates = set(study.user_attrs[STUDY_ATTR]["about"]["candidates"])  # as the study's model made them
    trials = study.get_trials(deepcopy=False)
    finished = [t.user_attrs["pipeline"] for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "pipeline" in t.user_attrs
                and "duplicate_of" not in t.user_attrs]
    problems = []
    twice = sorted(label for label, n in Counter(finished).items() if n > 1)
    missing = sorted(candidates - set(finished))
    foreign = sorted(set(finished) - candidates)
    left = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for what, items in (("finished more than once", twice), ("never finished", missing),
                        ("not in the grid", foreign), ("left RUNNING or WAITING", left)):
        if items:
            problems.append(f"{len(items)} {what}: {items[:5]}")
    report = json.loads((output_dir / "report.json").read_text())
    names = study.metric_names
    stored = {t.number: (t.state.name, t.values if t.state == TrialState.COMPLETE else None) for t in trials}
    reported = {t["number"]: (t["state"], [t[n] for n in names] if t["state"] == "COMPLETE" else None)
                for t in report["trials"]}
    if reported != stored:
        differ = sorted(n for n in set(stored) | set(reported) if stored.get(n) != reported.get(n))
        problems.append(f"report.json differs from the storage on trials {differ[:10]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--min_s", type=float, default=5.0, help="earliest kill, seconds after a start")
    p.add_argument("--max_s", type=float, default=60.0, help="latest kill, seconds after a start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", required=True)
    p.add_argument("--study_name", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--log", default=None, help="file for the runs' output (default: OUTPUT_DIR.log)")
    args = p.parse_args(own)
    if not 0 < args.min_s <= args.max_s:
        p.error("need 0 < --min_s <= --max_s")
    rng = random.Random(args.seed)
    out = Path(args.output_dir)
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", *rest, "--storage", args.storage,
           "--study_name", args.study_name, "--output_dir", str(out)]
    log_path = Path(args.log or f"{out}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        for i in range(1, args.kills + 1):
            after = rng.uniform(args.min_s, args.max_s)
            rc, took = run_once(cmd, after, log)
            what = "killed" if rc == -signal.SIGKILL else f"ended by itself (exit {rc})"
            print(f"round {i:2d}: {what} after {took:5.1f} s", flush=True)
        rc, took = run_once(cmd, None, log)
    print(f"final run: exit {rc} after {took:.1f} s", flush=True)
    if rc != 0:
        print(f"the final run failed; see {log_path}", file=sys.stderr)
        return 1
    problems = check(args.storage, args.study_name, out)
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print("OK: every configuration finished exactly once, no trial left RUNNING, report.json matches the storage")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
