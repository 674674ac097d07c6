"""Objectives by name: a third objective end to end (study directions, metric names, reports, best --pareto),
and a study that refuses to resume with other objectives."""

import json

import optuna

from compactmind.cli import main

THREE = "perplexity,compression_ratio,peak_memory_bytes"


def args(model_dir, text_file, tmp_path, objectives, out="out"):
    return ["-q", "run", "--model_path", str(model_dir), "--data_path", str(text_file), "--seq_len", "64",
            "--max_eval_windows", "2", "--data_samples", "1", "--target_ratio", "0.0", "--methods",
            "fp16,l2_pruning", "--no_hybrids", "--objectives", objectives, "--storage", f"sqlite:///{tmp_path}/s.db",
            "--study_name", "three", "--output_dir", str(tmp_path / out)]


def test_a_third_objective_end_to_end(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(args(tiny_model_dir, text_file, tmp_path, THREE)) == 0
    study = optuna.load_study(study_name="three", storage=f"sqlite:///{tmp_path}/s.db")
    assert study.metric_names == THREE.split(",")  # what the dashboard labels its axes with
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE", "MINIMIZE"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["objectives"]) == THREE.split(",")
    ok = [t for t in report["trials"] if t["status"] == "ok"]
    assert ok and all(t["peak_memory_bytes"] > 2**20 for t in ok)  # measured, not a placeholder
    for t in report["pareto_front"]:
        assert {"perplexity", "compression_ratio", "peak_memory_bytes"} <= set(t)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(len(t.values) == 3 and t.values[2] == t.user_attrs["peak_memory_bytes"] for t in complete)
    capsys.readouterr()
    assert main(["-q", "best", "--study_name", "three", "--storage", f"sqlite:///{tmp_path}/s.db", "--pareto"]) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header[:4] == ["trial", "perplexity", "compression_ratio", "peak_memory_bytes"]
    assert "peak_memory_bytes (minimize)" in printed and "front" in printed


def test_resuming_with_other_objectives_is_refused(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(args(tiny_model_dir, text_file, tmp_path, "perplexity,compression_ratio")) == 0
    capsys.readouterr()
    assert main(args(tiny_model_dir, text_file, tmp_path, THREE, out="again")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "objectives" in err and "peak_memory_bytes" in err
    assert not (tmp_path / "again").exists()
