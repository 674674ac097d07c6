"""Bad trials and interruptions: the study records them and goes on, or stops cleanly and resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from compactmind import registry
from compactmind.cli import main
from compactmind.models import block_linears
from compactmind.registry import Kind, Method, register_method
from compactmind.space import Categorical

from conftest import communicate, configurations, finished_trials

METHODS = "random_pruning,fp16"  # 16 configurations, hybrids among them


@pytest.fixture()
def faulty_methods():
    @register_method("test_oom")
    class OOM(Method):
        kind = Kind.QUANTIZATION

        @dataclass(frozen=True)
        class Params:
            when: str = "always"

        space = {"when": Categorical(["always"])}

        def apply_(self, model, params, calib, seed):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    @register_method("test_nan")
    class NaN(Method):
        kind = Kind.PRUNING

        @dataclass(frozen=True)
        class Params:
            when: str = "always"

        space = {"when": Categorical(["always"])}

        @torch.no_grad()
        def apply_(self, model, params, calib, seed):
            for _, lin in block_linears(model):
                lin.weight.fill_(float("nan"))

    yield
    registry._REGISTRY.pop("test_oom", None)
    registry._REGISTRY.pop("test_nan", None)


def test_out_of_memory_and_nan_trials_are_recorded_and_the_study_goes_on(faulty_methods, tiny_model_dir,
                                                                          text_file, tmp_path):
    rc = main(["-q", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
               "--max_eval_windows", "2", "--data_samples", "1", "--target_ratio", "0.0",
               "--methods", "test_oom,test_nan,fp16", "--storage", f"sqlite:///{tmp_path}/s.db",
               "--output_dir", str(tmp_path / "out")])
    assert rc == 0
    trials = {t["pipeline"]: t for t in json.loads((tmp_path / "out" / "report.json").read_text())["trials"]}
    oom = trials["test_oom"]
    assert oom["state"] == "FAIL" and oom["status"] == "out_of_memory" and "OutOfMemoryError" in oom["reason"]
    nan = trials["test_nan"]
    assert nan["state"] == "PRUNED" and nan["status"] == "nonfinite"
    assert trials["fp16"]["status"] == "ok"
    assert len(trials) == 3 + 4  # the two hybrids of each order ran too



def test_ctrl_c_stops_cleanly_writes_reports_and_resumes(tiny_model_dir, text_file, tmp_path):
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", "--model_path", str(tiny_model_dir),
           "--data_path", str(text_file), "--seq_len", "64", "--max_eval_windows", "30", "--data_samples", "2",
           "--target_ratio", "0.0", "--methods", METHODS,
           "--storage", f"sqlite:///{tmp_path}/s.db", "--study_name", "ctrlc", "--output_dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = tmp_path / "s.db"
    deadline = time.time() + 600  # the loop ends once the study is there; the bound only stops a hang
    while time.time() < deadline and proc.poll() is None and finished_trials(db) < 3:  # the study is running its trials
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = communicate(proc, 120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"Traceback" not in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert 0 < len(report["trials"]) < configurations(tiny_model_dir, METHODS)
    done = subprocess.run(cmd, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    trials = json.loads((tmp_path / "out" / "report.json").read_text())["trials"]
    finished = [t["pipeline"] for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == len(set(finished)) == configurations(tiny_model_dir, METHODS)
    assert not [t for t in trials if t["state"] == "RUNNING"]


def test_a_locked_sqlite_file_is_retried_with_backoff(tmp_path, monkeypatch, caplog):
    import sqlite3
    import threading

    import optuna

    from compactmind.study import storage as S

    monkeypatch.setattr(S, "SQLITE_BUSY_TIMEOUT_S", 0.05)  # SQLite's own wait gives up at once
    db = tmp_path / "s.db"
    storage = S.open_storage(f"sqlite:///{db}")
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "locked")
    other = sqlite3.connect(db, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the file
    threading.Timer(1.0, other.rollback).start()
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="compactmind.study.storage"):
        storage.set_study_user_attr(study_id, "written", "after the lock")
    assert time.monotonic() - started > 0.9
    assert storage.get_study_user_attrs(study_id) == {"written": "after the lock"}
    assert "database is locked" in caplog.text
    other.close()


def test_a_sigterm_during_a_storage_write_takes_effect_at_the_next_checkpoint(tmp_path):
    import sqlite3

    import optuna
    from sqlalchemy import event

    from compactmind import interrupt
    from compactmind.study import storage as S

    storage = S.open_storage(f"sqlite:///{tmp_path}/s.db")
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "signal")
    trial_id = storage.create_new_trial(study_id)

    def signal_mid_write(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO TRIAL_USER_ATTRIBUTES"):
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs on the next line of SQLAlchemy's own code

    event.listen(storage.engine, "before_cursor_execute", signal_mid_write)
    with interrupt.guard():
        storage.set_trial_user_attr(trial_id, "status", "written whole")  # the handler only records the signal
        with pytest.raises(interrupt.Terminated):
            interrupt.checkpoint()
    event.remove(storage.engine, "before_cursor_execute", signal_mid_write)
    assert storage.get_trial_user_attrs(trial_id) == {"status": "written whole"}
    other = sqlite3.connect(tmp_path / "s.db", timeout=0.1)
    other.execute("BEGIN IMMEDIATE")  # nothing in this process still holds the file's write lock
    other.rollback()
    other.close()
    storage.set_trial_user_attr(trial_id, "reason", "the shutdown writes at once")


def test_kill_nine_drill_short_version(alone, tiny_model_dir, text_file, tmp_path):
    """scripts/kill_resume.py with 3 kills: every configuration once, nothing RUNNING, reports = storage."""
    script = __import__("pathlib").Path(__file__).parents[1] / "scripts" / "kill_resume.py"
    done = subprocess.run(
        [sys.executable, str(script), "--kills", "3", "--min_s", "5", "--max_s", "10", "--seed", "1",
         "--storage", f"sqlite:///{tmp_path}/drill.db", "--study_name", "drill", "--output_dir", str(tmp_path / "out"),
         "--", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
         "--max_eval_windows", "30", "--data_samples", "2", "--target_ratio", "0.0",
         "--methods", "random_pruning,l2_pruning,fp16"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("-> exit -9") >= 1, done.stdout  # at least one kill landed mid-study
    assert "every configuration finished exactly once" in done.stdout and "FAIL" not in done.stdout


def test_term_drill_on_a_dynamic_study_short_version(alone, tiny_model_dir, text_file, tmp_path):
    """scripts/kill_resume.py on a dynamic study: its final check is the dynamic one (no profile measured twice
    at one stage, baselines and the best measured on the test windows), not the static grid's."""
    script = __import__("pathlib").Path(__file__).parents[1] / "scripts" / "kill_resume.py"
    (tmp_path / "data").mkdir()
    text = text_file.read_text()
    (tmp_path / "data" / "test.txt").write_text(text[: len(text) // 2])
    (tmp_path / "data" / "valid.txt").write_text(text[len(text) // 2:])
    done = subprocess.run(
        [sys.executable, str(script), "--signal", "TERM", "--rounds", "2", "--min_s", "4", "--max_s", "8",
         "--seed", "1", "--storage", f"sqlite:///{tmp_path}/drill.db", "--study_name", "drill",
         "--output_dir", str(tmp_path / "out"), "--", "--dynamic", "--model_path", str(tiny_model_dir),
         "--data_path", str(tmp_path / "data" / "test.txt"), "--seq_len", "48", "--max_eval_windows", "3",
         "--data_samples", "3", "--selection_windows", "2", "--methods", "rtn", "--no_hybrids",
         "--target_ratio", "0.74", "--n_trials", "8"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout and "final run: exit 0" in done.stdout, done.stdout
    assert done.stdout.count("-> exit 143") + done.stdout.count("-> exit 0") == 2, done.stdout
