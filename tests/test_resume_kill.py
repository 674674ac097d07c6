"""Kill a running study with SIGKILL mid-trial, run the same command again: every configuration ends up done
exactly once, the killed trial is failed by the heartbeat and retried, nothing is left RUNNING."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

from compactmind import pipeline as pl


def states(db):
    """The trials' states, read-only (the writer may be stopped holding its lock); none before the file exists."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("select state from trials").fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return []


def test_resume_after_kill_9_runs_everything_exactly_once(tiny_model_dir, text_file, tmp_path):
    db = tmp_path / "study.db"
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", "--model_path", str(tiny_model_dir),
           "--data_path", str(text_file), "--seq_len", "64", "--max_eval_windows", "30", "--data_samples", "2",
           "--target_ratio", "0.0", "--methods", "random_pruning,fp16", "--storage", f"sqlite:///{db}",
           "--study_name", "killme", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "COMPACTMIND_HEARTBEAT_S": "1", "COMPACTMIND_LOCK_WAIT_S": "5"}  # a short grace period
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # the loop ends once the study is there; the bound only stops a hang
    killed = False
    while time.time() < deadline and proc.poll() is None:
        proc.send_signal(signal.SIGSTOP)  # what it reads stays so until the kill lands
        rows = [r[0] for r in states(db)]
        if sum(r in ("COMPLETE", "PRUNED") for r in rows) >= 4 and "RUNNING" in rows:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    proc.wait()
    assert killed, f"the study ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert "RUNNING" in [r[0] for r in states(db)]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    expected = sorted(str(c) for c in pl.candidates(["random_pruning", "fp16"]))
    finished = sorted(t["pipeline"] for t in report["trials"] if t["state"] in ("COMPLETE", "PRUNED"))
    assert finished == expected
    assert not [t for t in report["trials"] if t["state"] in ("RUNNING", "WAITING")]
    failed = [t for t in report["trials"] if t["state"] == "FAIL"]
    assert len(failed) == 1
    if failed[0]["params"]:  # killed inside the trial: the heartbeat failed it and it was retried
        retries = [t for t in report["trials"] if t.get("retry_of") == failed[0]["number"]]
        assert len(retries) == 1 and retries[0]["state"] in ("COMPLETE", "PRUNED")
    # else killed while Optuna was creating it, before any parameter: stamped, failed once stale, not retried
    # (it held nothing), and its candidate ran as the grid's next
