"""Dynamic compression on a tiny real Llama: the level database, assembly, the level-switch mutation, and whole
dynamic studies through the CLI (resume, many workers, kill -9 mid-build and mid-trial)."""

import json
import math
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from compactmind import pipeline as pl
from compactmind.cli import main
from compactmind.data import Dataset
from compactmind.allocations import owl_profile
from compactmind.dynamic import Profile, open_db, units_of
from compactmind.errors import ConfigError
from compactmind.footprint import measure
from compactmind.models import LoadedModel, decoder_layers
from compactmind.study.sampler import EvoPressSampler
from compactmind.study.spaces import LevelSpace
from compactmind.executor import Executor

from conftest import communicate, tiny_model

IDS = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(4))
LEVELS = ["gptq(bits=2, group_size=32)", "gptq(bits=3, group_size=32)", "gptq(bits=4, group_size=32)"]


def executor_for(model, samples: int = 3) -> Executor:
    g = torch.Generator().manual_seed(5)
    data = Dataset(torch.randint(0, 320, (2, 40), generator=g), torch.randint(0, 320, (samples, 40), generator=g),
                   40, {"calib_source": "random ids", "calib_tokens": samples * 40})
    return Executor(LoadedModel(model, None, "tiny", "tiny", torch.device("cpu"), torch.float32), data)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def build(tmp_path, levels=LEVELS, granularity="block", model=None, key=None, **kw):
    executor = executor_for(model or tiny_model(num_hidden_layers=4))
    db = open_db(executor, [pl.parse(t) for t in levels], granularity, tmp_path / "levels", key or {"test": 1}, **kw)
    return executor, db


def test_an_assembled_profile_is_each_block_of_its_uniform_level(tmp_path):
    executor, db = build(tmp_path)
    profile = Profile((2, 0, 1, 2))
    executor.assemble(db, profile)
    assembled = logits(executor.model)
    # what the database promises: block i as applying level l_i to the whole model leaves it
    uniform = []
    for text in db.labels:
        model = tiny_model(num_hidden_layers=4)
        executor_for(model).compress(pl.parse(text))
        uniform.append(model)
    expected = tiny_model(num_hidden_layers=4)
    for i, level in enumerate(profile.levels):
        decoder_layers(expected)[i].load_state_dict(decoder_layers(uniform[level])[i].state_dict())
    top = uniform[-1]  # the rest (embeddings, final norm, head) as the most compressing level leaves it
    expected.model.embed_tokens.load_state_dict(top.model.embed_tokens.state_dict())
    expected.model.norm.load_state_dict(top.model.norm.state_dict())
    expected.lm_head.load_state_dict(top.lm_head.state_dict())
    assert torch.equal(assembled, logits(expected))
    assert not torch.equal(assembled, logits(uniform[0]))


def test_the_ratio_of_a_profile_is_exact_before_any_evaluation(tmp_path):
    executor, db = build(tmp_path, LEVELS + ["magnitude(sparsity=0.5)"])
    for levels in [(0, 0, 0, 0), (3, 2, 1, 0), (1, 3, 3, 2)]:
        compressed = executor.assemble(db, Profile(levels))
        assert compressed.footprint == measure(executor.model, executor.reference)  # bytes, ratio, sparsity


def test_levels_are_ordered_by_ratio_and_units_follow_the_granularity(tmp_path):
    _, db = build(tmp_path, [LEVELS[1], LEVELS[0], LEVELS[2]])
    assert db.labels == [str(pl.parse(t)) for t in reversed(LEVELS)]  # index 0 compresses least: 4, 3, 2 bits
    ratios = [lv.ratio for lv in db.levels]
    assert ratios == sorted(ratios) and len(set(ratios)) == 3
    model = tiny_model(num_hidden_layers=2)
    assert [u.name for u in units_of(model, "block")] == ["block.0", "block.1"]
    assert len(units_of(model, "linear")) == 2 * 7 and units_of(model, "linear")[0].name == "block.0.self_attn.q_proj"


def test_linear_granularity_refuses_methods_that_reach_outside_a_linear(tmp_path):
    with pytest.raises(ConfigError, match="use --granularity block"):
        build(tmp_path, ["awq(bits=4, group_size=32)"], "linear")
    executor, db = build(tmp_path, LEVELS, "linear")
    profile = Profile(tuple(random.Random(0).randrange(3) for _ in db.units))
    compressed = executor.assemble(db, profile)
    assert compressed.footprint == measure(executor.model, executor.reference)


def test_the_database_is_read_back_from_disk_not_rebuilt(tmp_path, monkeypatch):
    executor, db = build(tmp_path)
    executor.assemble(db, Profile((0, 1, 2, 1)))
    in_memory = logits(executor.model)
    folders = sorted((tmp_path / "levels").glob("*/level-*"))
    stamps = {f: (f / "units.safetensors").stat().st_mtime_ns for f in folders}
    seen = []
    monkeypatch.setattr("compactmind.dynamic._available_bytes", lambda device: 0)  # too big: units from disk
    executor2 = executor_for(tiny_model(num_hidden_layers=4))
    db2 = open_db(executor2, [pl.parse(t) for t in LEVELS], "block", tmp_path / "levels", {"test": 1},
                  lambda i, n, label, how: seen.append(how))
    assert all(how.startswith("read from disk") for how in seen) and len(seen) == 3
    assert not db2.in_memory
    executor2.assemble(db2, Profile((0, 1, 2, 1)))
    assert torch.equal(logits(executor2.model), in_memory)  # packed on disk, unpacked bit for bit
    assert {f: (f / "units.safetensors").stat().st_mtime_ns for f in folders} == stamps


def test_level_switch_mutation_keeps_the_ratio_and_owl_meets_the_target(tmp_path):
    executor, db = build(tmp_path)
    uniform_bytes = db.bytes_of(Profile((1, 1, 1, 1)))
    target = 1 - uniform_bytes / executor.reference.dense_bytes
    space = LevelSpace(db, "block", target, executor.reference.dense_bytes, "selection_perplexity")
    sampler = EvoPressSampler(space, seed=0)
    rng = random.Random(1)
    children = {sampler.mutate((1, 1, 1, 1), rng) for _ in range(40)}
    assert len(children) > 3  # it explores
    for child in children:
        assert db.bytes_of(Profile(child)) == uniform_bytes  # evenly spaced levels: a switch moves no byte
    assert owl_profile(db, [0.9, 0.1, 0.5, 0.2], space.feasible) is None  # OWL allocates sparsity, not bits


def test_the_mutation_trades_between_unit_sizes_so_a_depth_profile_changes_its_mix(tmp_path):
    executor, db = build(tmp_path, ["dense"], "sublayer", depth=True)
    drop = [o.label for o in db.options[0]].index("drop")
    names = [u.name for u in db.units]
    attn, mlp = ([i for i, n in enumerate(names) if n.endswith(kind)] for kind in ("self_attn", "mlp"))
    assert db.options[attn[0]][0].bytes != db.options[mlp[0]][0].bytes  # two size classes
    start = tuple(drop if n in {"block.1.self_attn", "block.2.mlp"} else 0 for n in names)
    dense = executor.reference.dense_bytes
    space = LevelSpace(db, "sublayer", 1 - db.bytes_of(Profile(start)) / dense, dense, "selection_kl")
    sampler = EvoPressSampler(space, seed=0)
    rng = random.Random(1)
    children = {sampler.mutate(start, rng) for _ in range(200)}
    assert all(space.feasible(child) for child in children)
    mixes = {(sum(c[i] == drop for i in attn), sum(c[i] == drop for i in mlp)) for c in children}
    assert len(mixes) > 1  # switches within a size class alone keep one attention and one MLP dropped


def dynamic_args(model_dir, tmp_path, *extra, name="dyn"):
    return ["-q", "run", "--dynamic", "--model_path", str(model_dir), "--data_path", str(tmp_path / "data" / "test.txt"),
            "--seq_len", "48", "--max_eval_windows", "3", "--data_samples", "3", "--selection_windows", "2",
            "--methods", "rtn", "--no_hybrids", "--target_ratio", "0.74", "--storage", f"sqlite:///{tmp_path}/s.db",
            "--study_name", name, "--output_dir", str(tmp_path / "out"), *extra]


@pytest.fixture()
def data_dir(tmp_path, text_file):
    (tmp_path / "data").mkdir()
    text = text_file.read_text()
    (tmp_path / "data" / "test.txt").write_text(text[: len(text) // 2])
    (tmp_path / "data" / "valid.txt").write_text(text[len(text) // 2:])
    return tmp_path


def test_a_dynamic_study_through_the_cli_then_resumed(tiny_model_dir, data_dir, capsys):
    tmp = data_dir
    assert main(dynamic_args(tiny_model_dir, tmp, "--n_trials", "12")) == 0
    report = json.loads((tmp / "out" / "report.json").read_text())
    assert report["quality"] == "selection_perplexity" and list(report["objectives"]) == [
        "selection_perplexity", "compression_ratio"]
    trials = report["trials"]
    assert {t.get("baseline") for t in trials} >= {"uniform"}
    for t in trials:  # the baselines are never stopped early: measured in full, then on the test windows
        if t.get("baseline") and "duplicate_of" not in t:
            assert t["state"] == "COMPLETE" and t["selection_windows"] == 2
            assert t.get("perplexity") is not None or t["baseline"] == "random"  # only the best random one
    randoms = [t for t in trials if t.get("baseline") == "random"]
    assert len([t for t in randoms if t.get("perplexity") is not None]) == (1 if randoms else 0)
    for t in trials:
        assert list(t["params"]) == ["block.0", "block.1"] and t["profile"] == [t["params"]["block.0"],
                                                                                  t["params"]["block.1"]]
        if t["state"] == "COMPLETE":
            assert t["selection_windows"] == 2 and ("window_nll" not in t or t.get("perplexity") is not None)
    tested = [t for t in trials if t.get("perplexity") is not None]
    assert tested and report["best"]["number"] in {t["number"] for t in tested}  # measured on the test windows
    assert all(t["windows"] == 3 for t in tested)
    assert (tmp / "out" / "profiles.png").stat().st_size > 10_000
    best = capsys.readouterr().out
    assert "selection_perplexity" in best
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "levels").rglob("level.json")}
    assert len(stamps) == 8
    assert main(dynamic_args(tiny_model_dir, tmp, "--n_trials", "4")) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp / "levels").rglob("level.json")} == stamps  # nothing rebuilt
    study = optuna.load_study(study_name="dyn", storage=f"sqlite:///{tmp}/s.db")
    assert len(study.trials) == 16


def test_a_depth_profile_exports_packed_and_the_formats_that_cannot_hold_it_refuse_by_name(tiny_model_dir, data_dir,
                                                                                            capsys):
    tmp = data_dir
    args = dynamic_args(tiny_model_dir, tmp, "--n_trials", "4", "--depth", "--granularity", "sublayer")
    args[args.index("rtn")] = "dense"
    args[args.index("--target_ratio") + 1] = "0.1"  # one attention or MLP sub-block of the two blocks must go
    assert main(args) == 0
    best = json.loads((tmp / "out" / "report.json").read_text())["best"]
    assert "x drop" in best["pipeline"]
    store = ["--study_name", "dyn", "--storage", f"sqlite:///{tmp}/s.db"]
    for fmt in ("dense", "gguf", "compressed-tensors"):
        capsys.readouterr()
        assert main(["-q", "export", *store, "--out", str(tmp / fmt), "--format", fmt]) == 1
        err = capsys.readouterr().err
        assert f"--format {fmt} cannot hold" in err and "drop" in err and err.count("\n") == 1
        assert not (tmp / fmt).exists()
    assert main(["-q", "export", *store, "--out", str(tmp / "packed"), "--verify"]) == 0
    manifest = json.loads((tmp / "packed" / "compactmind.json").read_text())
    assert manifest["verified_perplexity"] == pytest.approx(best["perplexity"], rel=1e-5)


def test_many_workers_share_a_dynamic_study_without_evaluating_a_profile_twice(alone, tiny_model_dir, data_dir):
    tmp = data_dir
    create = dynamic_args(tiny_model_dir, tmp, name="w")
    create[1] = "create"
    create = [a for a in create if a not in ("--output_dir", str(tmp / "out"))]
    assert main(create) == 0
    cmd = [sys.executable, "-m", "compactmind", "-q", "worker", "--study_name", "w", "--storage",
           f"sqlite:///{tmp}/s.db", "--n_trials", "10"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)]
    try:
        for p in procs:
            _, err = communicate(p, 600)
            assert p.returncode == 0, err.decode()[-2000:]
    finally:  # a failed check leaves no worker running into the next test
        for p in procs:
            if p.poll() is None:
                p.kill()
    study = optuna.load_study(study_name="w", storage=f"sqlite:///{tmp}/s.db")
    evaluated = [t.user_attrs["candidate"] for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")
                 and "duplicate_of" not in t.user_attrs and "candidate" in t.user_attrs]
    assert len(study.trials) == 30 and len(evaluated) == len(set(evaluated))
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]


def _count(db: Path, sql: str) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql).fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:  # not created yet
        return 0


def _run_until(cmd, condition, timeout=300) -> subprocess.Popen:
    """Start cmd and SIGKILL it as soon as condition() holds: each look is taken with the process stopped
    (SIGSTOP), so what it saw is still so when the kill lands."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        proc.send_signal(signal.SIGSTOP)
        if condition():
            proc.send_signal(signal.SIGKILL)
            break
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    if proc.poll() is None:  # the condition never held: the run is not left running into the next test
        proc.kill()
    proc.wait(timeout=60)
    return proc


def test_kill_9_mid_build_and_mid_trial_resumes_cleanly(tiny_model_dir, tmp_path, text_file):
    """A model big enough that building a GPTQ level takes a while: kill once the first level is on disk, resume
    (that level is read back, not rebuilt), kill again mid-trial, resume to the end: nothing left RUNNING."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tiny_model(vocab_size=json.loads((model_dir / "config.json").read_text())["vocab_size"], hidden_size=128,
               intermediate_size=512, num_hidden_layers=6).save_pretrained(model_dir)
    db = tmp_path / "s.db"
    cmd = [sys.executable, "-m", "compactmind", "-q", "run", "--dynamic", "--model_path", str(model_dir),
           "--data_path", str(text_file), "--seq_len", "64", "--max_eval_windows", "2", "--data_samples", "16",
           "--selection_windows", "2", "--methods", "gptq", "--no_hybrids", "--target_ratio", "0.70",
           "--n_trials", "25", "--storage", f"sqlite:///{db}", "--study_name", "k",
           "--output_dir", str(tmp_path / "out"), "--levels_dir", str(tmp_path / "levels")]
    levels = lambda: sorted(p for p in (tmp_path / "levels").rglob("level.json")  # noqa: E731
                            if not p.parent.name.startswith("."))  # finished levels, not one being written
    first = _run_until(cmd, lambda: len(levels()) >= 1)
    assert first.returncode == -signal.SIGKILL
    kept = {p: p.stat().st_mtime_ns for p in levels()}
    assert 1 <= len(kept) < 8, "killed mid-build"
    running = ("select count(*) from trials t where state = 'RUNNING' and exists "
               "(select 1 from trial_params p where p.trial_id = t.trial_id)")  # inside a trial, its profile taken
    second = _run_until(cmd, lambda: _count(db, "select count(*) from trials where state in ('COMPLETE', 'PRUNED')")
                        >= 3 and _count(db, running) >= 1)
    assert second.returncode == -signal.SIGKILL, second.stderr.read().decode()[-2000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # read back, not rebuilt
    assert len(levels()) == 8 and not [p for p in (tmp_path / "levels").rglob(".level-*") if p.is_dir()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and "WAITING" not in states
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and any(t.system_attrs.get("failed_trial") == failed[0].number for t in study.trials)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["best"] is not None and report["best"].get("perplexity") is not None


def test_dropped_sub_blocks_give_the_logits_of_a_model_with_them_removed_by_hand(tmp_path):
    executor, db = build(tmp_path, ["dense"], "sublayer", depth=True)
    drop = [o.label for o in db.options[0]].index("drop")
    names = [u.name for u in db.units]
    dropped = {"block.1.self_attn", "block.2.mlp", "block.3.self_attn", "block.3.mlp"}
    profile = Profile(tuple(drop if n in dropped else 0 for n in names))
    compressed = executor.assemble(db, profile)
    assert compressed.footprint == measure(executor.model, executor.reference)
    by_hand = tiny_model(num_hidden_layers=4)
    layers = decoder_layers(by_hand)

    def without_attention(layer):
        def forward(hidden_states, **kwargs):
            return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))
        return forward

    def without_mlp(layer):
        def forward(hidden_states, **kwargs):
            attn, _ = layer.self_attn(layer.input_layernorm(hidden_states), **kwargs)
            return hidden_states + attn
        return forward

    layers[1].forward = without_attention(layers[1])
    layers[2].forward = without_mlp(layers[2])
    layers[3].forward = lambda hidden_states, **kwargs: hidden_states
    assert torch.allclose(logits(executor.model), logits(by_hand), atol=1e-5)
    assert not torch.allclose(logits(executor.model), logits(tiny_model(num_hidden_layers=4)), atol=1e-3)


def test_an_embedding_units_ratio_equals_measure_on_the_assembled_model(tmp_path):
    executor, db = build(tmp_path, LEVELS, "block", embeddings=True)
    assert [u.name for u in db.units][-2:] == ["embed", "head"]  # the tiny model's head is untied
    for levels in [(0, 0, 0, 0, 0, 0), (2, 1, 0, 2, 2, 1), (1, 1, 1, 1, 1, 2)]:
        compressed = executor.assemble(db, Profile(levels))
        assert compressed.footprint == measure(executor.model, executor.reference)
    full, embedding_at_4_bits = (db.bytes_of(Profile((0, 0, 0, 0, 0, 0))),
                                 db.bytes_of(Profile((0, 0, 0, 0, 2, 0))))
    assert embedding_at_4_bits < full  # the embedding's own options trade bytes against the blocks


def test_an_assembly_that_changes_k_units_swaps_only_those_k(tmp_path, monkeypatch):
    monkeypatch.setattr("compactmind.dynamic._available_bytes", lambda device: 0)  # units read from disk
    executor, db = build(tmp_path, LEVELS, "linear")
    n = len(db.units)
    executor.assemble(db, Profile((0,) * n))
    read = {lv.folder: lv.tensors().read for lv in db.levels}
    swapped = executor.assembly.swapped
    executor.assemble(db, Profile((0,) * (n - 3) + (2, 1, 2)))
    assert executor.assembly.swapped - swapped == 3
    newly = {lv.folder: lv.tensors().read - read[lv.folder] for lv in db.levels}
    one = db.levels[2].params["model.layers.3.mlp.down_proj.weight"]  # the last unit, at level 2
    assert newly[db.levels[0].folder] == 0 and 0 < newly[db.levels[2].folder] < 3 * sum(
        t.numel() * t.element_size() for t in db.levels[2].tensors().parts("model.layers.3.mlp.down_proj.weight")
        .values()) and one["bytes"] > 0
    assert executor.assemble(db, Profile((0,) * (n - 3) + (2, 1, 2))).footprint == \
        measure(executor.model, executor.reference)


def test_changed_weights_or_calibration_rebuild_the_levels_and_a_damaged_level_is_rebuilt(tmp_path):
    built = []
    on_level = lambda i, n, label, how: built.append(how)  # noqa: E731
    build(tmp_path, LEVELS[:1], key={"weights": "a", "calibration": "x"}, on_level=on_level)
    build(tmp_path, LEVELS[:1], key={"weights": "a", "calibration": "x"}, on_level=on_level)
    build(tmp_path, LEVELS[:1], key={"weights": "b", "calibration": "x"}, on_level=on_level)
    build(tmp_path, LEVELS[:1], key={"weights": "a", "calibration": "y"}, on_level=on_level)
    assert [h.split(" in ")[0] for h in built] == ["built", "read from disk", "built", "built"]
    level = next((tmp_path / "levels").glob("*/level-*"))
    data = bytearray((level / "units.safetensors").read_bytes())
    data[-9] ^= 0xFF  # one flipped byte in the stored weights
    (level / "units.safetensors").write_bytes(bytes(data))
    from compactmind import dynamic

    dynamic._CHECKED.clear()  # a new process checks every level once
    built.clear()
    build(tmp_path, LEVELS[:1], key=json.loads(json.dumps({"weights": "a", "calibration": "x"})), on_level=on_level)
    assert built[0].startswith("built")


def test_kl_fitness_equals_a_kl_computed_by_hand():
    import torch.nn.functional as F

    from compactmind.evaluate import kl_divergence, window_logprobs

    dense, other = tiny_model(seed=0), tiny_model(seed=1)
    windows = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(2))
    reference = window_logprobs(dense, windows)
    result = kl_divergence(other, windows, reference, batch_size=2)
    with torch.no_grad():
        p = F.log_softmax(dense(windows).logits[:, :-1].float(), -1)
        q = F.log_softmax(other(windows).logits[:, :-1].float(), -1)
    by_hand = (p.exp() * (p - q)).sum(-1).mean().item()
    assert result.kl == pytest.approx(by_hand, rel=2e-3)  # the reference is stored in FP16
    nll = -q.gather(-1, windows[:, 1:].unsqueeze(-1)).mean().item()
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_the_staged_schedule_gives_each_stage_exactly_its_survivors_and_windows(tiny_model_dir, data_dir):
    tmp = data_dir
    args = dynamic_args(tiny_model_dir, tmp)
    args[args.index("--selection_windows") + 1] = "4"
    assert main([*args, "--offspring", "4", "--stages", "1x2", "--random_profiles", "0", "--no_early_stop",
                 "--n_trials", "14"]) == 0
    study = optuna.load_study(study_name="dyn", storage=f"sqlite:///{tmp}/s.db")
    from compactmind.study.spaces import EVO_ATTR

    searched = [t for t in study.trials if EVO_ATTR in t.system_attrs]
    by_gen: dict = {}
    for t in searched:
        evo = t.system_attrs[EVO_ATTR]
        by_gen.setdefault(evo["generation"], {}).setdefault(evo["stage"], []).append(t)
    first = by_gen[0]
    assert len(first[0]) == 4 and all(t.user_attrs["selection_windows"] == 1 for t in first[0])
    assert all(t.state.name == "PRUNED" and t.user_attrs["status"] == "stage" for t in first[0])
    assert len(first[1]) == 2 and all(t.user_attrs["selection_windows"] == 4 for t in first[1])
    best_two = sorted(first[0], key=lambda t: t.user_attrs["selection_perplexity"])[:2]
    assert {tuple(t.params.values()) for t in first[1]} == {tuple(t.params.values()) for t in best_two}
    assert 1 in by_gen and len(by_gen[1][0]) >= 1  # then the next generation


def test_a_stop_asked_for_while_the_levels_are_read_or_the_kl_reference_is_measured_takes_effect_there(tmp_path):
    """Both steps come between the levels and the first trial and take seconds to minutes on a real model: each
    is a checkpoint per level read and per window, not a stretch a signal has to wait out."""
    from compactmind import interrupt
    from compactmind.study.spaces import Scorer

    executor, db = build(tmp_path)
    assert db.in_memory
    db._memory.clear()
    scorer = Scorer("selection_kl", executor.data.windows, "selection_", None)
    with interrupt.guard():
        interrupt.request(interrupt.Terminated)
        with pytest.raises(interrupt.Terminated):
            db.keep_in_memory_if_it_fits()
        assert not db.in_memory  # stopped before the first level was read
        interrupt.request(interrupt.Interrupted)
        with pytest.raises(interrupt.Interrupted):
            scorer.prepare(executor)
    scorer.prepare(executor)  # no stop asked: the reference is measured
    assert scorer.reference(executor).shape[0] == executor.data.windows.shape[0]
