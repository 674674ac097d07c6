"""Every strategy runs through the CLI on the structured space; early stopping records partial figures."""

import json

import optuna
import pytest

from compactmind.cli import main


def args(model_dir, text_file, tmp_path, *extra):
    return ["-q", "run", "--model_path", str(model_dir), "--data_path", str(text_file), "--seq_len", "64",
            "--max_eval_windows", "4", "--data_samples", "2", "--target_ratio", "0.3",
            "--methods", "random_pruning,fp16", "--storage", f"sqlite:///{tmp_path}/s.db",
            "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("strategy", ["tpe", "nsga2", "random", "qmc", "gp"])
def test_budgeted_strategies_use_the_structured_space(strategy, tiny_model_dir, text_file, tmp_path):
    assert main(args(tiny_model_dir, text_file, tmp_path, "--strategy", strategy, "--n_trials", "8",
                     "--seed", "3", "--study_name", strategy)) == 0
    study = optuna.load_study(study_name=strategy, storage=f"sqlite:///{tmp_path}/s.db")
    assert len(study.trials) == 8
    for t in study.trials:
        shape = t.params["pipeline"]
        assert shape in ("random_pruning", "fp16", "random_pruning -> fp16", "fp16 -> random_pruning")
        assert ("random_pruning.sparsity" in t.params) == ("random_pruning" in shape)
        assert t.user_attrs["pipeline"].startswith(shape.split(" -> ")[0])


def test_bruteforce_enumerates_the_space_once(tiny_model_dir, text_file, tmp_path):
    assert main(args(tiny_model_dir, text_file, tmp_path, "--strategy", "bruteforce", "--study_name", "bf")) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    labels = [t["pipeline"] for t in report["trials"]]
    assert len(labels) == len(set(labels)) == 5 + 1 + 2 * 5


def test_unknown_strategy_is_one_clear_sentence(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(args(tiny_model_dir, text_file, tmp_path, "--strategy", "annealing")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Unknown strategy 'annealing'" in err and "tpe" in err


def test_early_stopping_by_dominance_and_by_cap(tiny_model_dir, text_file, tmp_path):
    # margin 1.0: any candidate running worse than a finished feasible trial with a ratio as high is stopped
    assert main(args(tiny_model_dir, text_file, tmp_path, "--study_name", "es", "--max_eval_windows", "8",
                     "--target_ratio", "0.0", "--dominance_margin", "1.0")) == 0
    trials = json.loads((tmp_path / "out" / "report.json").read_text())["trials"]
    stopped = [t for t in trials if t["status"] == "early_stopped"]
    assert stopped and all(t["state"] == "PRUNED" and t["windows"] < 8 and t["partial_perplexity"] > 0
                           and t["perplexity"] is None for t in stopped)  # the partial figure in its own field
    assert any("that of trial" in t["reason"] for t in stopped)
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    for t in stopped:  # each stopped one really had a finished rival with at least its ratio
        assert any(c["compression_ratio"] >= t["compression_ratio"] and c["number"] < t["number"] for c in complete)
    assert main(args(tiny_model_dir, text_file, tmp_path, "--study_name", "cap", "--ppl_cap_factor", "1.0001",
                     "--target_ratio", "0.0", "--dominance_margin", "1000", "--max_eval_windows", "8")) == 0
    trials = json.loads((tmp_path / "out" / "report.json").read_text())["trials"]
    assert any(t["status"] == "early_stopped" and "the dense model's on the same windows" in t["reason"] for t in trials)
    assert main(args(tiny_model_dir, text_file, tmp_path, "--study_name", "none", "--no_early_stop",
                     "--ppl_cap_factor", "1.0001", "--target_ratio", "0.0", "--max_eval_windows", "8")) == 0
    trials = json.loads((tmp_path / "out" / "report.json").read_text())["trials"]
    assert not any(t["status"] == "early_stopped" for t in trials)
    assert any(t["status"] == "over_cap" and t["feasible"] is False for t in trials)  # measured, infeasible
