"""A study notices what changed under it, shuts down cleanly on SIGTERM, and survives two processes creating it
at the same moment."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from compactmind.cli import main

from conftest import communicate, configurations, finished_trials, tiny_model

METHODS = "random_pruning,fp16"  # 16 configurations, hybrids among them


def args(model_dir, data, tmp_path, *extra, name="s"):
    return ["-q", "run", "--model_path", str(model_dir), "--data_path", str(data), "--seq_len", "64",
            "--max_eval_windows", "3", "--data_samples", "1", "--target_ratio", "0.0", "--methods", "fp16,bf16",
            "--storage", f"sqlite:///{tmp_path}/s.db", "--study_name", name, "--output_dir", str(tmp_path / "out"),
            *extra]


@pytest.fixture()
def own_copies(tiny_model_dir, text_file, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "corpus.txt"
    shutil.copyfile(text_file, data)
    return model, data


def test_new_weights_at_the_same_path_are_refused_naming_them(own_copies, tmp_path, capsys):
    model, data = own_copies
    assert main(args(model, data, tmp_path)) == 0
    tiny_model(seed=7, vocab_size=json.loads((model / "config.json").read_text())["vocab_size"]).save_pretrained(model)
    capsys.readouterr()
    assert main(args(model, data, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "model weights (their content changed)" in err and err.count("\n") == 1


def test_the_same_text_in_another_order_is_refused_naming_it(own_copies, tmp_path, capsys):
    model, data = own_copies
    assert main(args(model, data, tmp_path)) == 0
    paragraphs = data.read_text().split("\n\n")
    paragraphs[0], paragraphs[1] = paragraphs[1], paragraphs[0]  # same characters, same length
    data.write_text("\n\n".join(paragraphs))
    capsys.readouterr()
    assert main(args(model, data, tmp_path)) == 1
    assert "evaluation text (its tokens changed)" in capsys.readouterr().err


def test_a_study_moved_elsewhere_resumes_and_other_search_settings_are_refused(own_copies, tmp_path, capsys,
                                                                               monkeypatch):
    model, data = own_copies
    assert main(args(model, data, tmp_path)) == 0
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(model), moved / "model")
    shutil.move(str(data), moved / "corpus.txt")
    monkeypatch.chdir(moved)  # relative paths, another folder: the content is the same study
    assert main(args("model", "corpus.txt", tmp_path)) == 0
    capsys.readouterr()
    assert main(args("model", "corpus.txt", tmp_path, "--strategy", "tpe", "--n_trials", "1")) == 1
    assert "search.strategy (the study: grid; this run: tpe)" in capsys.readouterr().err


def test_export_verify_exits_non_zero_when_the_perplexity_differs(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(args(tiny_model_dir, text_file, tmp_path)) == 0
    con = sqlite3.connect(tmp_path / "s.db")
    con.execute("update trial_values set value = 123.0 where objective = 0")  # a wrong record of the perplexity
    con.commit()
    con.close()
    capsys.readouterr()
    assert main(["-q", "export", "--study_name", "s", "--storage", f"sqlite:///{tmp_path}/s.db", "--trial", "0",
                 "--out", str(tmp_path / "m"), "--verify"]) == 1
    out = capsys.readouterr()
    assert "differs from trial 0's 123" in out.err and "reloaded perplexity" in out.out


def test_sigterm_fails_the_running_trial_with_its_reason_writes_reports_and_resumes(tiny_model_dir, text_file,
                                                                                  tmp_path):
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", "--model_path", str(tiny_model_dir), "--data_path",
           str(text_file), "--seq_len", "64", "--max_eval_windows", "30", "--data_samples", "2", "--target_ratio",
           "0.0", "--methods", METHODS, "--storage", f"sqlite:///{tmp_path}/s.db", "--study_name", "term",
           "--output_dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # the loop ends once the study is there; the bound only stops a hang
    while time.time() < deadline and proc.poll() is None and finished_trials(tmp_path / "s.db") < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = communicate(proc, 120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "resume with:" in out, err[:6000]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert 0 < len(report["trials"]) < configurations(tiny_model_dir, METHODS)
    stopped = [t for t in report["trials"] if t["state"] == "FAIL"]
    assert all(t["status"] == "terminated" for t in stopped), stopped
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = json.loads((tmp_path / "out" / "report.json").read_text())["trials"]
    finished = [t["pipeline"] for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == len(set(finished)) == configurations(tiny_model_dir, METHODS)
    assert not [t for t in trials if t["state"] in ("RUNNING", "WAITING")]


def test_two_processes_creating_one_new_sqlite_study_at_once_both_proceed(alone, tiny_model_dir, text_file, tmp_path):
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", "--model_path", str(tiny_model_dir), "--data_path",
           str(text_file), "--seq_len", "64", "--max_eval_windows", "2", "--data_samples", "1", "--target_ratio",
           "0.0", "--methods", METHODS, "--storage", f"sqlite:///{tmp_path}/new.db", "--study_name", "race"]
    procs = [subprocess.Popen([*cmd, "--output_dir", str(tmp_path / f"out{i}")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = communicate(p, 600)
        assert p.returncode == 0, err[-2000:]
    import optuna

    study = optuna.load_study(study_name="race", storage=f"sqlite:///{tmp_path}/new.db")
    done = [t.user_attrs["pipeline"] for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")
            and t.user_attrs.get("status") != "spare"]
    assert len(done) == len(set(done)) == configurations(tiny_model_dir, METHODS)  # each once between the two


def test_a_study_name_never_becomes_a_path_as_it_is(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "x/../../escape"
    assert main(args(tiny_model_dir, text_file, tmp_path, name=name)) == 0
    assert main(["-q", "report", "--study_name", name, "--storage", f"sqlite:///{tmp_path}/s.db"]) == 0
    reports = list((tmp_path / "results").glob("report_*/report.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["study"] == name
    assert not list(tmp_path.parent.glob("escape*")) and not list(tmp_path.glob("escape*"))


def test_a_checkpoint_missing_weights_is_refused_and_an_export_folder_loads_as_exported(tiny_model_dir, text_file,
                                                                                       tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    state = load_file(broken / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    evaluate = ["-q", "eval", "--data_path", str(text_file), "--seq_len", "64", "--max_eval_windows", "2", "--json"]
    assert main([*evaluate, "--model_path", str(broken)]) == 1
    assert "lacks 1 weights" in capsys.readouterr().err  # never a silent random init
    assert main(["-q", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                 "--max_eval_windows", "2", "--data_samples", "1", "--methods", "rtn", "--target_ratio", "0.7",
                 "--storage", f"sqlite:///{tmp_path}/s.db", "--study_name", "e", "--output_dir",
                 str(tmp_path / "out")]) == 0
    assert main(["-q", "export", "--study_name", "e", "--storage", f"sqlite:///{tmp_path}/s.db", "--out",
                 str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main([*evaluate, "--model_path", str(tmp_path / "m")]) == 0
    figures = json.loads(capsys.readouterr().out)
    best = json.loads((tmp_path / "out" / "report.json").read_text())["best"]
    assert figures["perplexity"] == pytest.approx(best["perplexity"], rel=1e-6)  # the exported weights, unpacked


def test_a_new_version_of_a_method_is_refused_on_resume_naming_it(tiny_model_dir, text_file, tmp_path, monkeypatch,
                                                                   capsys):
    from compactmind.registry import get_method

    assert main(args(tiny_model_dir, text_file, tmp_path)) == 0
    monkeypatch.setattr(type(get_method("bf16")), "version", get_method("bf16").version + 1)  # bf16 now rounds anew
    capsys.readouterr()
    assert main(args(tiny_model_dir, text_file, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "version of bf16 (the study: 1; this run: 2" in err and err.count("\n") == 1


def test_a_terminated_dynamic_baseline_is_measured_when_the_study_resumes(tiny_model_dir, text_file, tmp_path,
                                                                         monkeypatch):
    from compactmind.study import spaces

    (tmp_path / "data").mkdir()
    text = text_file.read_text()
    (tmp_path / "data" / "test.txt").write_text(text[: len(text) // 2])
    (tmp_path / "data" / "valid.txt").write_text(text[len(text) // 2:])
    run = ["-q", "run", "--dynamic", "--model_path", str(tiny_model_dir), "--data_path",
           str(tmp_path / "data" / "test.txt"), "--seq_len", "48", "--max_eval_windows", "2", "--data_samples", "2",
           "--selection_windows", "2", "--methods", "rtn", "--no_hybrids", "--target_ratio", "0.74",
           "--storage", f"sqlite:///{tmp_path}/s.db", "--study_name", "dyn", "--output_dir", str(tmp_path / "out"),
           "--n_trials", "3"]
    compress = spaces.LevelSpace.compress

    def terminated(self, executor, profile):  # SIGTERM lands in the first trial: the uniform baseline
        os.kill(os.getpid(), signal.SIGTERM)
        return compress(self, executor, profile)

    monkeypatch.setattr(spaces.LevelSpace, "compress", terminated)
    assert main(run) == 143
    monkeypatch.setattr(spaces.LevelSpace, "compress", compress)
    first = json.loads((tmp_path / "out" / "report.json").read_text())["trials"]
    seen = [(t.get("baseline"), t["state"], t["status"]) for t in first]
    assert seen[0] == ("uniform", "FAIL", "terminated") and len(seen) > 1  # RTN levels: no OWL; random profiles
    assert set(seen[1:]) == {("random", "WAITING", None)}
    assert main(run) == 0
    trials = json.loads((tmp_path / "out" / "report.json").read_text())["trials"]
    measured = [t for t in trials if t.get("baseline") == "uniform" and t["state"] == "COMPLETE"]
    assert len(measured) == 1 and measured[0]["number"] > 0


def test_the_resume_line_never_prints_a_storage_password():
    from compactmind.cli.console import resume_command

    for argv in (["run", "--storage", "postgresql://me:s3cret@db/x"], ["run", "--storage=postgresql://me:s3cret@db/x"]):
        line = resume_command(argv)
        assert "s3cret" not in line and "postgresql://me:***@db/x" in line


def test_written_files_and_level_folders_have_the_users_permissions(tmp_path):
    from compactmind.files import atomic_folder, atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "report.json", "{}")

        def fill(folder):
            (folder / "inner").mkdir()
            (folder / "inner" / "units.safetensors").write_bytes(b"x")

        atomic_folder(tmp_path / "level-1", fill)
    finally:
        os.umask(old)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "level-1").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "level-1" / "inner").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "level-1" / "inner" / "units.safetensors").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["level-1", "report.json"]  # no temporary left


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    from compactmind.files import atomic_write

    atomic_write(tmp_path / "r.json", "old")
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "r.json", 12345)  # not bytes: fails mid-write
    assert (tmp_path / "r.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
