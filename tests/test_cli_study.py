"""A whole study through the CLI as a user calls it, on a tiny real model and real SQLite files."""

import json
import os
import sqlite3
from pathlib import Path

import pytest

from compactmind import pipeline as pl
from compactmind.cli import main

from conftest import default_dtype


METHODS = ["random_pruning", "l2_pruning", "fp16", "int8_sq"]


def run_args(model_dir, text_file, tmp_path, *extra):
    return ["-q", "run", "--model_path", str(model_dir), "--data_path", str(text_file), "--seq_len", "64",
            "--max_eval_windows", "3", "--data_samples", "2", "--target_ratio", "0.3",
            "--storage", f"sqlite:///{tmp_path}/study.db", "--study_name", "s1", "--output_dir", str(tmp_path / "out"),
            "--methods", ",".join(METHODS), *extra]


def db_trials(tmp_path, study="s1"):
    con = sqlite3.connect(tmp_path / "study.db")
    try:
        return con.execute("select t.number, t.state from trials t join studies s using(study_id) "
                           "where s.study_name = ? order by t.number", (study,)).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def finished(tiny_model_dir, text_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    args = run_args(tiny_model_dir, text_file, tmp)
    rc = main(args)
    return tmp, args, rc


def test_study_runs_every_candidate_once_and_writes_reports(finished, capsys):
    tmp, _, rc = finished
    assert rc == 0
    out = tmp / "out"
    for name in ("report.json", "search_history.csv", "search_space_analysis.png", "search_space_analysis.html"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    expected = {str(c) for c in pl.candidates(METHODS)}
    labels = [t["pipeline"] for t in report["trials"]]
    assert sorted(labels) == sorted(expected)  # each configuration exactly once
    assert len(db_trials(tmp)) == len(expected)
    states = {t["status"] for t in report["trials"]}
    assert {"ok", "infeasible", "invalid"} <= states
    for t in report["trials"]:
        if t["status"] == "infeasible":
            assert t["compression_ratio"] < 0.3 and t["windows"] == 0 and t["perplexity"] is None
            assert t["state"] == "PRUNED" and t["feasible"] is False
        if t["status"] == "ok":
            for key in ("pipeline", "steps", "compression_ratio", "bits_per_weight", "sparsity", "model_bytes",
                        "compress_seconds", "eval_seconds", "windows", "eval_tokens", "dtype", "perplexity"):
                assert key in t, key
            assert t["windows"] == 3 and t["eval_tokens"] == 3 * 64 and t["dtype"] == default_dtype()
            assert len(t["window_nll"]) == 3 and t["worker"].endswith(tuple("0123456789"))
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            assert 10 * 2**20 < t["peak_host_memory_bytes"] < total  # this trial's peak resident set
    feasible = [t for t in report["trials"] if t["state"] == "COMPLETE" and t["compression_ratio"] >= 0.3]
    assert report["best"]["number"] == min(feasible, key=lambda t: t["perplexity"])["number"]
    assert report["dense"]["perplexity"] > 0 and report["protocol"]["seq_len"] == 64
    assert all(p["compression_ratio"] >= 0.3 for p in report["pareto_front"])
    csv_lines = (out / "search_history.csv").read_text().splitlines()
    assert len(csv_lines) == len(expected) + 1 and "bits_per_weight" in csv_lines[0]


def test_metric_names_and_dashboard_constraints_are_stored(finished):
    import optuna

    tmp, _, _ = finished
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{tmp}/study.db")
    assert study.metric_names == ["perplexity", "compression_ratio"]
    infeasible = [t for t in study.trials if t.user_attrs.get("status") == "infeasible"]
    assert infeasible and all(t.system_attrs["constraints"][0] > 0 for t in infeasible)
    ok = [t for t in study.trials if t.user_attrs.get("status") == "ok"]
    assert all(t.system_attrs["constraints"][0] <= 0 for t in ok)
    assert all(t.params["pipeline"] == pl.parse(t.user_attrs["pipeline"]).shape for t in ok)


def test_running_again_resumes_without_rerunning(finished, capsys):
    tmp, args, _ = finished
    before = db_trials(tmp)
    assert main(args) == 0
    assert db_trials(tmp) == before
    assert "best:" in capsys.readouterr().out


def test_report_and_best_rebuild_from_storage_alone(finished, capsys):
    tmp, _, _ = finished
    storage = f"sqlite:///{tmp}/study.db"
    assert main(["-q", "report", "--study_name", "s1", "--storage", storage, "--output_dir", str(tmp / "again")]) == 0
    a = json.loads((tmp / "out" / "report.json").read_text())
    b = json.loads((tmp / "again" / "report.json").read_text())
    assert a["trials"] == b["trials"] and a["best"] == b["best"]
    capsys.readouterr()
    assert main(["-q", "best", "--study_name", "s1", "--storage", storage, "--pareto"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, dense, best = lines[0].split(), lines[1].split(), lines[2].split()
    assert header[:4] == ["trial", "perplexity", "compression_ratio", "bits_per_weight"]  # one column order
    assert dense[0] == "dense" and float(dense[2]) == pytest.approx(a["dense"]["perplexity"], abs=1e-4)
    assert best[:2] == ["best", str(a["best"]["number"])] and a["best"]["pipeline"] in lines[2]
    front = [line.split()[1] for line in lines if line.startswith("front ")]
    assert front == [str(t["number"]) for t in a["pareto_front"]]


def test_a_changed_search_space_is_refused_under_the_same_name(finished, tiny_model_dir, text_file, capsys):
    tmp, args, _ = finished
    before = db_trials(tmp)
    assert main(args[:-1] + ["fp16"]) == 1
    assert "different search_space" in capsys.readouterr().err
    assert db_trials(tmp) == before


def test_eval_prints_one_json_object(tiny_model_dir, text_file, capsys):
    rc = main(["-q", "eval", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
               "--max_eval_windows", "2", "--data_samples", "1", "--pipeline", "fp16", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compression_ratio"] == 0.5 and out["seq_len"] == 64 and out["windows"] == 2
    assert out["dtype"] == default_dtype() and out["perplexity"] > 1
    # against a 16-bit baseline, FP16 saves nothing
    assert main(["-q", "eval", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                 "--max_eval_windows", "2", "--data_samples", "1", "--pipeline", "fp16", "--json",
                 "--baseline_bits", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["compression_ratio"] == 0.0


def test_study_file_sets_defaults_and_flags_override(tiny_model_dir, text_file, tmp_path):
    study = tmp_path / "s.toml"
    study.write_text(f'''
[run]
model_path = "{tiny_model_dir}"
data_path = "{text_file}"
seq_len = 64
max_eval_windows = 2
data_samples = 1
target_ratio = 0.9
methods = ["random_pruning", "fp16"]
study_name = "from-file"
storage = "sqlite:///{tmp_path}/study.db"

[grids.random_pruning]
sparsity = [0.25]
''')
    rc = main(["-q", "run", "--study", str(study), "--target_ratio", "0.4", "--output_dir", str(tmp_path / "o")])
    assert rc == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["target_ratio"] == 0.4  # the flag won over the file
    assert [t["pipeline"] for t in report["trials"]] == [
        "random_pruning(sparsity=0.25)", "fp16", "random_pruning(sparsity=0.25) -> fp16",
        "fp16 -> random_pruning(sparsity=0.25)"]


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("studies/*.toml")), ids=lambda p: p.name)
def test_shipped_study_files_parse_into_a_valid_search(path):
    """Every study file under studies/ names known flags, known methods and grids inside their spaces."""
    from compactmind.cli import parse_config
    from compactmind.study.session import candidates_of

    cfg = parse_config(["run", "--study", str(path)])
    candidates = candidates_of(cfg)
    assert len(candidates) == len({str(c) for c in candidates}) > 0


def test_the_original_grid_study_is_the_original_tools_grid():
    from compactmind.cli import parse_config
    from compactmind.study.session import candidates_of

    cfg = parse_config(["run", "--study", str(Path(__file__).parents[1] / "studies" / "llama2_7b_original_grid.toml")])
    candidates = candidates_of(cfg)
    singles = [c for c in candidates if not c.is_hybrid]
    # random 5 + L2 9 + FP16 1 + INT8-SQ 3; hybrids: each pruning x each quantization, in both orders
    assert len(singles) == 18
    assert len(candidates) - len(singles) == 2 * (5 + 9) * (1 + 3)
    assert cfg.gpu and cfg.seq_len == 2048 and cfg.target_ratio == 0.8


def _run_cli(args, tty: bool) -> str:
    import os
    import pty
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "compactmind", *args]
    if not tty:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_and_in_plain_lines_during_compression_and_evaluation(tiny_model_dir, text_file,
                                                                                    tmp_path, monkeypatch):
    def args(name):
        return ["run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                "--max_eval_windows", "6", "--data_samples", "1", "--target_ratio", "0.0", "--methods", "fp16,gptq",
                "--no_hybrids", "--storage", f"sqlite:///{tmp_path}/{name}.db", "--output_dir", str(tmp_path / name)]

    terminal = _run_cli(args("tty"), tty=True)
    assert "trials:" in terminal and "9/9" in terminal and "\r" in terminal  # a redrawn bar
    assert "[trial 0] (1/9) fp16" in terminal
    assert "compressing gptq(bits=3" in terminal and "block" in terminal  # the method's blocks, as they go
    monkeypatch.setenv("COMPACTMIND_LOG_EVERY_S", "0")  # a log line at every step, not every 10 s
    plain = _run_cli(args("plain"), tty=False)
    assert "[trial 0] fp16" in plain and "[trial 1] gptq(bits=3" in plain
    assert "compressing gptq(bits=3" in plain and ": block 1/2" in plain and "evaluating: window 6/6" in plain
    assert "trials:" not in plain and "\r" not in plain
    report = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert [t["number"] for t in report["trials"]] == list(range(9))  # the numbers the lines showed


def test_the_perplexity_cap_is_a_constraint_with_or_without_early_stopping(tiny_model_dir, text_file, tmp_path):
    """Over the cap, a fully evaluated candidate is measured but infeasible: never best, never on the front."""
    fronts = {}
    for name, extra in (("with", []), ("without", ["--no_early_stop"])):
        rc = main(["-q", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                   "--max_eval_windows", "8", "--data_samples", "1", "--target_ratio", "0.0", "--ppl_cap_factor",
                   "1.002", "--methods", "random_pruning,fp16", "--no_hybrids", "--storage",
                   f"sqlite:///{tmp_path}/{name}.db", "--output_dir", str(tmp_path / name), *extra])
        assert rc == 0
        report = json.loads((tmp_path / name / "report.json").read_text())
        cap = 1.002 * report["dense"]["perplexity"]
        over = [t for t in report["trials"] if t["status"] in ("over_cap", "early_stopped")]
        assert over, "the tight cap stops some candidate"
        if name == "without":
            assert all(t["status"] == "over_cap" and t["state"] == "COMPLETE" and t["feasible"] is False
                       and t["perplexity"] > cap for t in over)
        assert all(t["perplexity"] <= cap for t in report["pareto_front"])
        assert report["best"] is None or report["best"]["perplexity"] <= cap
        fronts[name] = [t["pipeline"] for t in report["pareto_front"]]
    assert fronts["with"] == fronts["without"]
