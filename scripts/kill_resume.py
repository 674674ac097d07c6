"""Fault drill: stop a running study with a signal at random moments, resume it each time, then check it.

    python scripts/kill_resume.py --signal TERM --rounds 50 --storage sqlite:///storage/drill.db \
        --study_name drill --output_dir results/drill -- --study studies/demo.toml

Everything after `--` goes to `compactmind run` as it is. Each round starts the run and sends it --signal
(KILL: kill -9, no cleanup; TERM: what Slurm and Kubernetes send; INT: Ctrl-C) after a random number of seconds
in [--min_s, --max_s], so the signal lands anywhere: model load, level build, the dense baseline, a trial's
compression or evaluation, report writing. The round's log says where it landed. After the last round the run
is left to finish. Checked:
- each TERM/INT round ends by itself with exit 143/130 (or 0 when the run had finished), without a traceback,
  within --max_exit_s (a round that hangs gets its stacks dumped with SIGUSR1, then is killed: a failure);
- after each TERM/INT round no trial is RUNNING, and report.json, when the round wrote one, equals the storage;
- at the end: every candidate configuration finished (COMPLETE or PRUNED) exactly once (a static study), or no
  profile was measured twice at one selection stage and every baseline and the best trial were measured on the test
  windows (a dynamic study); no trial is left RUNNING or WAITING, and report.json lists exactly the storage's
  trials, with the same states and values.
Prints the rounds and the checks, and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
EXPECTED = {"TERM": 143, "INT": 130}


def phase_of(lines: list[str]) -> str:
    """Where a run was when its output stopped: the last phase its log lines show."""
    phase, dynamic, trials = "model load", False, False
    for line in lines:
        if re.search(r"(new|resuming) study", line):
            phase, dynamic = "dense baseline", "levels per" in line
        elif "dense perplexity" in line:
            phase = "level build" if dynamic else "trials"
        elif re.match(r"level (\d+)/\1\b", line):  # the last level built or read
            phase = "level database load"
        elif line.startswith("level database") or "the level database" in line:
            phase = "trial setup"  # the dense reference for KL, then the first trial
        elif line.startswith("[trial ") or line.startswith("dense reference"):
            phase, trials = "trials", True
        elif "compressing" in line:
            phase = "trial compression" if trials or not dynamic else "level build"
        elif "evaluating:" in line:
            phase = "trial evaluation" if phase not in ("dense baseline", "final test measurement") else phase
        elif "on the test windows" in line:
            phase = "final test measurement"
        elif "writing the reports" in line:
            phase = "report writing"
    return phase


def run_once(cmd: list[str], sig: str, after: float | None, log,
             max_exit_s: float) -> tuple[int | None, float, str, str | None]:
    """(exit code or None when it hung, seconds, its output, its output before the signal or None when the run
    ended before it was sent). The phase a signal landed in is read from the output before it: after a signal the
    run writes its reports, so its last lines always say so."""
    started = time.monotonic()
    start_at = log.tell()
    env = {**os.environ, "COMPACTMIND_LOG_EVERY_S": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    before = None
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        signalled_at = os.fstat(log.fileno()).st_size  # the child writes to the file itself, unbuffered
        proc.send_signal(SIGNALS[sig])
        before = _since(log, start_at, signalled_at)
        try:
            proc.wait(timeout=max_exit_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack into the log
            time.sleep(2)
            proc.kill()
            proc.wait()
            log.flush()
            return None, time.monotonic() - started, _since(log, start_at), before
    log.flush()
    return proc.returncode, time.monotonic() - started, _since(log, start_at), before


def _since(log, offset: int, end: int | None = None) -> str:
    with open(log.name, "rb") as fh:
        fh.seek(offset)
        return fh.read(-1 if end is None else max(0, end - offset)).decode(errors="replace")


def check(storage_url: str, study_name: str, output_dir: Path, final: bool) -> list[str]:
    """The problems found; empty when the study is whole (final) or consistent (after a round)."""
    from optuna.trial import TrialState

    from compactmind.study.records import study_meta
    from compactmind.study.session import open_records

    try:
        study, _ = open_records(storage_url, study_name)
    except Exception as exc:
        before = any(x in str(exc) for x in ("does not exist", "holds no Optuna studies", "No study named"))
        return [] if before and not final else [f"the study cannot be read: {exc}"]  # stopped before it existed
    trials = study.get_trials(deepcopy=False)
    problems = []
    left = [t.number for t in trials if t.state == TrialState.RUNNING or (final and t.state == TrialState.WAITING)]
    if left:
        problems.append(f"{len(left)} left RUNNING{' or WAITING' if final else ''}: {left[:5]}")
    meta = study_meta(study.user_attrs)
    dynamic = "units" in meta  # a dynamic study's levels and units sit at the top of its record
    if final and dynamic:
        problems += _dynamic_problems(study, trials)
    if final and not dynamic:
        candidates = set(meta["about"]["candidates"])  # as the study's model made them
        finished = [t.user_attrs["pipeline"] for t in trials
                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "pipeline" in t.user_attrs
                    and "duplicate_of" not in t.user_attrs and t.user_attrs.get("status") != "spare"]
        for what, items in (("finished more than once", sorted(k for k, n in Counter(finished).items() if n > 1)),
                            ("never finished", sorted(candidates - set(finished))),
                            ("not in the grid", sorted(set(finished) - candidates))):
            if items:
                problems.append(f"{len(items)} {what}: {items[:5]}")
    report_path = output_dir / "report.json"
    if not report_path.exists():
        return problems + (["no report.json"] if final else [])
    report = json.loads(report_path.read_text())
    if final and dynamic and "perplexity" not in (report.get("best") or {}):
        problems.append("report.json has no best trial measured on the test windows")
    names = study.metric_names
    stored = {t.number: (t.state.name, t.values if t.state == TrialState.COMPLETE else None) for t in trials}
    reported = {t["number"]: (t["state"], [t[n] for n in names] if t["state"] == "COMPLETE" else None)
                for t in report["trials"]}
    if reported != stored:
        differ = sorted(n for n in set(stored) | set(reported) if stored.get(n) != reported.get(n))
        problems.append(f"report.json differs from the storage on trials {differ[:10]}")
    return problems


def _dynamic_problems(study, trials) -> list[str]:
    """A dynamic study scores a profile many times (each selection stage is a trial): no stage's profile was
    measured twice, and every baseline that completed was measured on the test windows."""
    from optuna.trial import TrialState

    from compactmind.study.records import BASELINE_ATTR, TEST_ATTR

    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and "duplicate_of" not in t.user_attrs and t.user_attrs.get("status") != "spare"]
    twice = sorted(k for k, n in Counter(t.user_attrs.get("candidate") for t in finished).items() if k and n > 1)
    untested = [t.number for t in finished if t.state == TrialState.COMPLETE
                and t.user_attrs.get(BASELINE_ATTR) not in (None, "random")
                and f"{TEST_ATTR}{t.number}" not in study.user_attrs]
    return [f"{len(items)} {what}: {items[:5]}" for what, items in (
        ("profiles measured more than once at one stage", twice),
        ("baselines never measured on the test windows", untested)) if items]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--signal", choices=sorted(SIGNALS), default="KILL")
    p.add_argument("--rounds", "--kills", type=int, default=10, dest="rounds")
    p.add_argument("--min_s", type=float, default=5.0, help="earliest signal, seconds after a start")
    p.add_argument("--max_s", type=float, default=60.0, help="latest signal, seconds after a start")
    p.add_argument("--max_exit_s", type=float, default=120.0, help="a TERM/INT round must end within this")
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
    cmd = [sys.executable, "-m", "compactmind", "run", *rest, "--storage", args.storage,
           "--study_name", args.study_name, "--output_dir", str(out)]
    log_path = Path(args.log or f"{out}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    failures, phases, codes = [], Counter(), Counter()
    with open(log_path, "ab") as log:
        for i in range(1, args.rounds + 1):
            after = rng.uniform(args.min_s, args.max_s)
            rc, took, output, before = run_once(cmd, args.signal, after, log, args.max_exit_s)
            landed = "after the run ended" if before is None else phase_of([x for x in before.splitlines() if x.strip()])
            phases[landed] += 1
            codes[rc] += 1
            problems = _round_problems(args.signal, rc, output)
            if args.signal != "KILL" and rc is not None:
                problems += check(args.storage, args.study_name, out, final=False)
            failures += [f"round {i}: {x}" for x in problems]
            print(f"round {i:2d}: SIG{args.signal} after {after:5.1f} s ({landed}) -> exit {rc}, {took:5.1f} s"
                  + (f"  FAIL: {'; '.join(problems)}" if problems else ""), flush=True)
        rc, took, output, _ = run_once(cmd, args.signal, None, log, args.max_exit_s)
    print(f"final run: exit {rc} after {took:.1f} s", flush=True)
    print(f"signals landed: {dict(phases)}; exit codes: {dict(codes)}")
    if rc != 0:
        failures.append(f"the final run failed (exit {rc}); see {log_path}")
    else:
        failures += [f"at the end: {x}" for x in check(args.storage, args.study_name, out, final=True)]
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print("OK: every round ended as its signal says, every configuration finished exactly once, no trial left "
              "RUNNING, report.json matches the storage")
    return 1 if failures else 0


def _round_problems(sig: str, rc: int | None, output: str) -> list[str]:
    if rc is None:
        return ["hung after the signal (stacks in the log)"]
    if sig == "KILL":
        return [] if rc in (-signal.SIGKILL, 0) else [f"exit {rc}"]
    problems = [] if rc in (EXPECTED[sig], 0) else [f"exit {rc}, expected {EXPECTED[sig]} or 0"]
    if "Traceback" in output or "Exception ignored" in output:
        problems.append("a traceback in its output")
    return problems


if __name__ == "__main__":
    sys.exit(main())
