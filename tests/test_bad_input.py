"""Bad input through the CLI, table-driven: one clear sentence on stderr, a non-zero exit, no traceback, no
report written and no storage created or changed."""

import shutil
import sqlite3

import pytest
import torch

from compactmind.cli import main


@pytest.fixture()
def env(tmp_path, tiny_model_dir, text_file):
    """Files the cases point at."""
    (tmp_path / "empty_model").mkdir()
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"x" * 100)
    corrupt = tmp_path / "corrupt_model"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 50)
    truncated = tmp_path / "truncated_model"
    shutil.copytree(tiny_model_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "short.txt").write_text("just a few words")
    (tmp_path / "notadb.db").write_text("this is not a database\n" * 10)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.toml").write_text("[run\ntarget_ratio = ")
    import os

    os.mkfifo(tmp_path / "fifo")
    real = sqlite3.connect(tmp_path / "real.db")  # a real SQLite file without any study
    real.execute("create table t (x int)")
    real.commit()
    real.close()
    import optuna

    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path}/study.db")
    return {"tmp": tmp_path, "model": str(tiny_model_dir), "text": str(text_file)}


def run(env, *extra, model=None, data=None, storage=None):
    return ["run", "--model_path", model or env["model"], "--data_path", data or env["text"], "--seq_len", "32",
            "--max_eval_windows", "1", "--data_samples", "1", "--methods", "fp16",
            "--storage", storage or f"sqlite:///{env['tmp']}/new.db", "--output_dir", str(env["tmp"] / "out"), *extra]


def evaluate(env, *extra):
    return ["eval", "--model_path", env["model"], "--data_path", env["text"], "--seq_len", "32",
            "--max_eval_windows", "1", "--data_samples", "1", *extra]


CASES = {
    "missing model folder": (lambda e: run(e, model=str(e["tmp"] / "nope")), "does not exist"),
    "empty model folder": (lambda e: run(e, model=str(e["tmp"] / "empty_model")), "no config.json"),
    "folder without config.json": (lambda e: run(e, model=str(e["tmp"] / "no_config")), "no config.json"),
    "corrupt weights file": (lambda e: run(e, model=str(e["tmp"] / "corrupt_model")), "Could not load the model"),
    "truncated weights file": (lambda e: run(e, model=str(e["tmp"] / "truncated_model")), "Could not load the model"),
    "model path is a text file": (lambda e: run(e, model=e["text"]), "not a .gguf file"),
    "missing data file": (lambda e: run(e, data=str(e["tmp"] / "nope.txt")), "does not exist"),
    "unreadable data file": (lambda e: run(e, data="/proc/self/mem"), "cannot be read"),
    "empty data file": (lambda e: run(e, data=str(e["tmp"] / "empty.txt")), "is empty"),
    "binary data file": (lambda e: run(e, data=str(e["tmp"] / "binary.bin")), "looks binary"),
    "data shorter than one window": (lambda e: run(e, data=str(e["tmp"] / "short.txt")), "fewer than one window"),
    "data folder without a test file": (lambda e: run(e, data=str(e["tmp"] / "empty_model")), "no test text file"),
    "target ratio above 1": (lambda e: run(e, "--target_ratio", "1.5"), "--target_ratio must be"),
    "target ratio below 0": (lambda e: run(e, "--target_ratio", "-0.1"), "--target_ratio must be"),
    "target ratio not a number": (lambda e: run(e, "--target_ratio", "abc"), "invalid float value"),
    "unknown method": (lambda e: run(e, "--methods", "fp16,quantum"), "Unknown method 'quantum'"),
    "no method at all": (lambda e: run(e, "--methods", ","), "No candidate pipelines"),
    "unknown strategy": (lambda e: run(e, "--strategy", "annealing"), "Unknown strategy"),
    "unknown flag": (lambda e: run(e, "--turbo"), "unrecognized arguments: --turbo"),
    "pipeline text that does not parse": (lambda e: evaluate(e, "--pipeline", "fp16 -> (("), "Cannot parse"),
    "pipeline with an unknown parameter": (lambda e: evaluate(e, "--pipeline", "rtn(width=3)"), "no parameter"),
    "pipeline with an unknown method": (lambda e: evaluate(e, "--pipeline", "zip(level=9)"), "Unknown method"),
    "data_samples zero": (lambda e: run(e, "--data_samples", "0"), "--data_samples must be"),
    "data_samples negative": (lambda e: run(e, "--data_samples", "-4"), "--data_samples must be"),
    "seq_len above the model's limit": (lambda e: run(e, "--seq_len", "4096"), "above the model's context"),
    "seq_len too small": (lambda e: run(e, "--seq_len", "1"), "--seq_len must be"),
    "max_eval_windows zero": (lambda e: run(e, "--max_eval_windows", "0"), "--max_eval_windows must be"),
    "gpu without a gpu": (lambda e: run(e, "--gpu"), "no CUDA GPU"),
    "gpu and cpu together": (lambda e: run(e, "--gpu", "--cpu"), "exclude each other"),
    "storage URL that cannot be opened": (
        lambda e: run(e, storage="postgresql+psycopg2://nobody@127.0.0.1:1/none"), "Cannot reach the storage"),
    "storage URL with a password that cannot be opened": (
        lambda e: run(e, storage="postgresql+psycopg2://nobody:Sekr1tPw@127.0.0.1:1/none"), "Cannot reach the storage"),
    "storage that is not a URL": (lambda e: run(e, storage="just-a-name"), "not a database URL"),
    "SQLite file that is not a database": (
        lambda e: run(e, storage=f"sqlite:///{e['tmp']}/notadb.db"), "is not an SQLite database"),
    "study that does not exist (report)": (
        lambda e: ["report", "--study_name", "ghost", "--storage", f"sqlite:///{e['tmp']}/study.db"], "No study named"),
    "study that does not exist (best)": (
        lambda e: ["best", "--study_name", "ghost", "--storage", f"sqlite:///{e['tmp']}/study.db"], "No study named"),
    "SQLite file without studies (best)": (
        lambda e: ["best", "--study_name", "x", "--storage", f"sqlite:///{e['tmp']}/real.db"], "holds no Optuna"),
    "study database that does not exist (report)": (
        lambda e: ["report", "--study_name", "x", "--storage", f"sqlite:///{e['tmp']}/none.db"], "does not exist"),
    "output folder that cannot be made": (
        lambda e: run(e, "--output_dir", str(e["tmp"] / "afile" / "out")), "Cannot create the output folder"),
    "missing study file": (lambda e: ["run", "--study", str(e["tmp"] / "none.toml")], "does not exist"),
    "study file that is not TOML": (lambda e: ["run", "--study", str(e["tmp"] / "bad.toml")], "not valid TOML"),
    "a pipe as data": (lambda e: run(e, data=str(e["tmp"] / "fifo")), "not a regular file"),
    "a device as data": (lambda e: run(e, data="/dev/zero"), "not a regular file"),
    "the test file as calibration text": (lambda e: run(e, "--calib_path", e["text"]), "is the evaluation file"),
    "study file whose run is not a table": (lambda e: study_file(e, "run = 5\n"), "must be tables"),
    "study file with a fractional seq_len": (lambda e: study_file(e, "[run]\nseq_len = 32.5\n"),
                                             "seq_len must be an integer"),
    "study file with methods = 5": (lambda e: study_file(e, "[run]\nmethods = 5\n"), "methods must be"),
    "study file with storage = 5": (lambda e: study_file(e, "[run]\nstorage = 5\n"), "storage must be a text"),
    "study file with gpu = 'no'": (lambda e: study_file(e, '[run]\ngpu = "no"\n'), "gpu must be true or false"),
    "study file with a grid for a method not searched": (
        lambda e: study_file(e, '[run]\nmethods = ["fp16"]\n[grids.rtn]\nbits = [4]\n'), "does not search"),
    "dominance margin nan": (lambda e: run(e, "--dominance_margin", "nan"), "dominance_margin must be"),
    "a method named twice": (lambda e: run(e, "--methods", "fp16,fp16"), "names a method twice"),
    "an empty study name": (lambda e: run(e, "--study_name", ""), "--study_name must be"),
    "a 10,000-character study name": (lambda e: run(e, "--study_name", "x" * 10_000), "--study_name must be"),
    "a parameter given twice": (lambda e: evaluate(e, "--pipeline", "rtn(bits=4, bits=3)"), "sets bits twice"),
    "an in-memory SQLite storage": (lambda e: run(e, storage="sqlite:///:memory:"), "in-memory SQLite"),
    "a port that is not a port": (lambda e: ["dashboard", "--storage", f"sqlite:///{e['tmp']}/study.db", "--port",
                                             "70000"], "not a TCP port"),
    "evopress without --dynamic": (lambda e: run(e, "--strategy", "evopress"), "add --dynamic"),
    "grid with --dynamic": (lambda e: run(e, "--dynamic", "--strategy", "grid"), "far too many profiles"),
}


def study_file(e, text: str) -> list[str]:
    path = e["tmp"] / "study.toml"
    path.write_text(text)
    return ["run", "--study", str(path), "--model_path", e["model"], "--data_path", e["text"], "--seq_len", "32",
            "--max_eval_windows", "1", "--data_samples", "1", "--storage", f"sqlite:///{e['tmp']}/new.db",
            "--output_dir", str(e["tmp"] / "out")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_clear_sentence(case, env, capsys):
    if case == "gpu without a gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    make_argv, expected = CASES[case]
    before = {p: p.stat().st_mtime_ns for p in env["tmp"].glob("*.db")}
    rc = main(["-q", *make_argv(env)])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert expected in lines[0], err
    assert "Sekr1tPw" not in err
    assert not (env["tmp"] / "out").exists()  # no report, not even an empty folder
    assert not (env["tmp"] / "new.db").exists()  # no storage created
    assert {p: p.stat().st_mtime_ns for p in env["tmp"].glob("*.db")} == before  # none changed

