"""Ctrl-C and SIGTERM are recorded and take effect at compactmind's own checkpoints, over the whole command: model
load, the dense baseline, levels, trials, report writing. A second signal raises at once, a third ends the
process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest

from compactmind import interrupt
from compactmind.cli import main

from conftest import communicate


def test_a_signal_is_recorded_and_raised_only_at_the_next_checkpoint():
    with interrupt.guard():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # whatever runs now (logging, a generator's close, a restore) is never cut short
            time.sleep(0.001)
        assert interrupt.pending() is interrupt.Terminated
        with pytest.raises(interrupt.Terminated):
            interrupt.checkpoint()
        interrupt.checkpoint()  # raised once: the stop is taken


def test_a_second_signal_raises_at_once_and_a_third_ends_the_process(tmp_path):
    child = textwrap.dedent("""
        import sys, time
        from compactmind import interrupt
        with interrupt.guard():
            print("ready", flush=True)
            try:
                while interrupt.pending() is None:
                    time.sleep(0.01)   # no checkpoint here
                print("recorded", flush=True)
                while True:
                    time.sleep(0.01)
            except interrupt.Interrupted as exc:
                print("raised", type(exc).__name__, flush=True)
            while True:
                time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "recorded"  # recorded only, nothing raised
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().split() == ["raised", "Terminated"]  # the first signal's kind, at once
        proc.send_signal(signal.SIGTERM)
        communicate(proc, 30)
        assert proc.returncode == -signal.SIGTERM
    finally:
        proc.kill()


def _run_cmd(model_dir, data, tmp_path, *extra):
    return [sys.executable, "-m", "compactmind", "run", "--model_path", str(model_dir), "--data_path", str(data),
            "--seq_len", "64", "--max_eval_windows", "4", "--data_samples", "1", "--target_ratio", "0.0",
            "--methods", "fp16,bf16", "--storage", f"sqlite:///{tmp_path}/s.db", "--study_name", "stops",
            "--output_dir", str(tmp_path / "out"), *extra]


def _signal_on_line(cmd, text: str, sig=signal.SIGTERM):
    """Run cmd and send `sig` the moment its log shows a line containing `text`; (exit code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if text in line:
            proc.send_signal(sig)
            break
    out, err = communicate(proc, 120)
    return proc.returncode, out, "".join(lines) + err


def test_sigterm_during_the_model_load_exits_143_with_the_resume_line(tiny_model_dir, text_file, tmp_path):
    code, out, err = _signal_on_line(_run_cmd(tiny_model_dir, text_file, tmp_path), "loading model")
    assert code == 143, err[-3000:]
    assert "Traceback" not in err and "terminated before the study was opened; resume with: compactmind " in out


def test_sigterm_while_the_reports_are_written_still_leaves_them_whole(tiny_model_dir, text_file, tmp_path):
    code, out, err = _signal_on_line(_run_cmd(tiny_model_dir, text_file, tmp_path), "writing the reports")
    assert code == 143, err[-3000:]
    assert "Traceback" not in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    study = optuna.load_study(study_name="stops", storage=f"sqlite:///{tmp_path}/s.db")
    assert {t["number"]: t["state"] for t in report["trials"]} == {t.number: t.state.name for t in study.trials}
    assert (tmp_path / "out" / "search_space_analysis.png").stat().st_size > 0


def test_a_signal_in_the_teardown_after_the_command_exits_as_compactmind_says_not_as_killed():
    """The interpreter's teardown after the command (seconds with a model loaded; here an exit hook that waits)
    still answers SIGTERM with compactmind's status, 143, and the output written so far, never as killed (-15)."""
    child = textwrap.dedent("""
        import atexit, sys, time
        from compactmind import cli
        atexit.register(lambda: (print("teardown", flush=True), time.sleep(60)))
        sys.argv = ["compactmind", "methods"]
        cli.entry()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "teardown":
                proc.send_signal(signal.SIGTERM)
                break
        communicate(proc, 30)
        assert lines and lines[-1].strip() == "teardown", "".join(lines)[-2000:]
        assert "gptq" in "".join(lines)  # the command's own output came first
        assert proc.returncode == 143
    finally:
        proc.kill()


def test_a_signal_after_the_last_trials_checkpoint_is_not_dropped(tiny_model_dir, text_file, tmp_path, monkeypatch,
                                                                  capsys):
    from compactmind.study import objective

    finish = objective.TrialRun.finish

    def finish_then_signal(run):  # SIGTERM arrives as the budget's last trial ends, after all its checkpoints
        finish(run)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(objective.TrialRun, "finish", finish_then_signal)
    code = main(["-q", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                 "--max_eval_windows", "2", "--data_samples", "1", "--target_ratio", "0.0", "--methods", "fp16,bf16",
                 "--strategy", "random", "--n_trials", "1", "--storage", f"sqlite:///{tmp_path}/s.db",
                 "--study_name", "late", "--output_dir", str(tmp_path / "out")])
    assert code == 143
    trials = json.loads((tmp_path / "out" / "report.json").read_text())["trials"]
    assert [(t["state"], t["status"]) for t in trials] == [("COMPLETE", "ok")]  # the trial itself was done
    assert "resume with:" in capsys.readouterr().out
