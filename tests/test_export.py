"""Export: the packed folder unpacks to exactly the evaluated model, loads through transformers, and is small."""

import json

import pytest
import torch

from compactmind import deploy, packed
from compactmind.deploy import compressed_tensors, dense, packed_folder
from compactmind.packing import folder_bytes
from compactmind import pipeline as pl
from compactmind.calibration import Calibration
from compactmind.cli import main
from compactmind.footprint import Reference, measure

from conftest import tiny_model

IDS = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(3))
PIPELINES = [
    "rtn(bits=4, group_size=32)", "rtn(bits=3, group_size=0)", "rtn(bits=2, group_size=32, symmetric=true)",
    "rtn(bits=8, group_size=32)", "gptq(bits=4, group_size=32)", "awq(bits=4, group_size=32)",
    "int8_sq(alpha=0.5)", "fp16", "bf16", "magnitude(sparsity=0.5)", "wanda_nm(pattern=2:4)",
    "l2_pruning(sparsity=0.5, scope=both)", "magnitude(sparsity=0.5) -> rtn(bits=4, group_size=32)",
    "sparsegpt_nm(pattern=2:4) -> gptq(bits=4, group_size=32)", "int8_sq(alpha=0.5) -> l2_pruning(sparsity=0.5, "
    "scope=both)", "rtn(bits=4, group_size=32) -> l2_pruning(sparsity=0.25, scope=mlp)",
    "rtn(bits=4, group_size=32) -> sparsegpt(sparsity=0.5)", "random_pruning(sparsity=0.3) -> fp16",
]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("text", PIPELINES)
def test_packed_folder_unpacks_to_the_evaluated_model(text, tmp_path):
    model = tiny_model()
    reference = Reference.of(model)
    pl.apply_(model, pl.parse(text), Calibration(torch.randint(0, 320, (3, 40))), 0)
    fp = measure(model, reference)
    expected = logits(model)
    packed_folder.write(model, None, tmp_path / "out", {"pipeline": text})
    back = packed.load(tmp_path / "out")
    assert torch.equal(logits(back), expected)  # bit for bit: codes, scales, masks and shapes round-trip
    on_disk = folder_bytes(tmp_path / "out")
    # The file holds what the accounting counts (plus the safetensors header and bitmap padding).
    assert on_disk <= fp.model_bytes * 1.02 + 16_384, (on_disk, fp.model_bytes)
    assert on_disk >= fp.model_bytes * 0.98


def test_bit_packing_round_trips_every_width():
    for bits in (1, 2, 3, 4, 5, 8):
        codes = torch.randint(0, 2 ** bits, (1001,), dtype=torch.uint8)
        stream = packed.pack_bits(codes, bits)
        assert stream.numel() == -(-1001 * bits // 8)
        assert torch.equal(packed.unpack_bits(stream, bits, 1001), codes)


def test_cli_export_of_the_best_trial_loads_with_transformers_and_gives_its_perplexity(tiny_model_dir, text_file,
                                                                                        tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    storage = f"sqlite:///{tmp_path}/s.db"
    assert main(["-q", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                 "--max_eval_windows", "3", "--data_samples", "2", "--target_ratio", "0.7",
                 "--methods", "magnitude,rtn", "--storage", storage, "--study_name", "exp",
                 "--output_dir", str(tmp_path / "rep")]) == 0
    best = json.loads((tmp_path / "rep" / "report.json").read_text())["best"]
    capsys.readouterr()
    assert main(["-q", "export", "--study_name", "exp", "--storage", storage, "--out", str(tmp_path / "m"),
                 "--verify"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "m" / "compactmind.json").read_text())
    assert manifest["pipeline"] == best["pipeline"] and manifest["trial"] == best["number"]
    assert manifest["verified_perplexity"] == pytest.approx(best["perplexity"], rel=1e-5)
    assert f"trial {best['number']}" in printed
    dense = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()) * 4
    assert folder_bytes(tmp_path / "m") < (1 - 0.7) * dense * 1.05  # really smaller, about as recorded
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(model), logits(packed.load(tmp_path / "m")))
    # the folder is a Hugging Face folder: the tokenizer loads from it too
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "m")("hello world")["input_ids"]


def test_export_refuses_a_trial_that_does_not_exist_and_a_non_empty_folder(tiny_model_dir, text_file, tmp_path,
                                                                          capsys):
    storage = f"sqlite:///{tmp_path}/s.db"
    assert main(["-q", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                 "--max_eval_windows", "2", "--data_samples", "1", "--target_ratio", "0.3", "--methods", "fp16",
                 "--storage", storage, "--study_name", "e", "--output_dir", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    assert main(["-q", "export", "--study_name", "e", "--storage", storage, "--trial", "99",
                 "--out", str(tmp_path / "m")]) == 1
    assert "has no trial 99" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["-q", "export", "--study_name", "e", "--storage", storage, "--out", str(tmp_path / "full")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ---- deployment formats: loaded by transformers alone ------------------------------------------------------


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("text", ["rtn(bits=4, group_size=32)", "rtn(bits=3, group_size=0, symmetric=true)",
                                  "gptq(bits=4, group_size=32)", "awq(bits=4, group_size=32)",
                                  "rtn(bits=8, group_size=32)", "fp16 -> rtn(bits=2, group_size=32)"])
def test_compressed_tensors_folder_loads_in_transformers_with_the_evaluated_logits(text, tmp_path):

    model = tiny_model()
    pl.apply_(model, pl.parse(text), Calibration(torch.randint(0, 320, (3, 40))), 0)
    expected = logits(model)
    compressed_tensors.write(model, None, tmp_path / "ct", {"pipeline": text})
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "_name_or_path" not in config and "auto_map" not in config
    back = _hf(tmp_path / "ct")
    assert type(back.model.layers[0].mlp.down_proj) is torch.nn.Linear  # decompressed: no compactmind code runs
    assert torch.equal(logits(back), expected)  # the packed codes, scales and zero points are the evaluated ones


def test_compressed_tensors_w8a8_within_its_stated_tolerance(tmp_path):

    model = tiny_model()
    pl.apply_(model, pl.parse("int8_sq(alpha=0.5)"), Calibration(torch.randint(0, 320, (3, 40))), 0)
    expected = logits(model)
    compressed_tensors.write(model, None, tmp_path / "ct", {})
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized" and config["config_groups"]["group_0"]["input_activations"][
        "strategy"] == "token"
    got = logits(_hf(tmp_path / "ct"))
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()  # activations not quantized on this path


def test_dense_checkpoint_is_plain_fp16(tmp_path):

    model = tiny_model()
    pl.apply_(model, pl.parse("magnitude(sparsity=0.5) -> fp16"), None, 0)
    expected = logits(model)
    dense.write(model, None, tmp_path / "d", {})
    back = _hf(tmp_path / "d")
    assert torch.equal(logits(back), expected)  # FP16 values: exact in FP16
    assert (back.model.layers[0].mlp.up_proj.weight == 0).float().mean() >= 0.5


@pytest.mark.parametrize("methods, fmt, reason", [
    (["l2_pruning"], "compressed-tensors", "cannot hold l2_pruning"),
    (["l2_pruning", "rtn"], "dense", "cannot hold l2_pruning"),
    (["magnitude", "rtn"], "compressed-tensors", "cannot hold magnitude"),
])
def test_formats_refuse_what_they_cannot_hold_by_name(methods, fmt, reason):

    assert reason in deploy.get(fmt).impl().refusal([methods])
    assert deploy.get("packed").impl().refusal([methods]) is None


def test_cli_export_in_compressed_tensors_reloads_with_the_trials_perplexity(tiny_model_dir, text_file, tmp_path,
                                                                           capsys):
    storage = f"sqlite:///{tmp_path}/s.db"
    assert main(["-q", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                 "--max_eval_windows", "3", "--data_samples", "2", "--target_ratio", "0.7", "--methods", "rtn",
                 "--storage", storage, "--study_name", "ct", "--output_dir", str(tmp_path / "rep")]) == 0
    assert main(["-q", "export", "--study_name", "ct", "--storage", storage, "--out", str(tmp_path / "m"),
                 "--format", "compressed-tensors", "--verify"]) == 0
    manifest = json.loads((tmp_path / "m" / "compactmind.json").read_text())
    best = json.loads((tmp_path / "rep" / "report.json").read_text())["best"]
    assert manifest["verified_perplexity"] == pytest.approx(best["perplexity"], rel=1e-5)


def _tiny_step(name: str) -> str:
    """Each method at a setting the tiny model takes (group size 32 divides its widths)."""
    settings = {"rtn": "rtn(bits=3, group_size=32)", "gptq": "gptq(bits=4, group_size=32)",
                "awq": "awq(bits=4, group_size=32)", "l2_pruning": "l2_pruning(sparsity=0.5, scope=both)",
                "int8_sq": "int8_sq(alpha=0.5)", "magnitude_nm": "magnitude_nm(pattern=4:8)", "fp8": "fp8"}
    from compactmind.registry import get_method

    if name in settings:
        return settings[name]
    return name if not get_method(name).space else f"{name}({next(iter(get_method(name).space))}=" + (
        "0.5)" if "sparsity" in get_method(name).space else "2:4)")


def _every_method_and_hybrid_order() -> list[str]:
    from compactmind.registry import Kind, all_methods

    methods = {n: m for n, m in all_methods().items() if n != "gguf"}  # gguf: its own byte test (test_gguf.py)
    prune = [n for n, m in methods.items() if m.kind == Kind.PRUNING]
    quant = [n for n, m in methods.items() if m.kind == Kind.QUANTIZATION]
    singles = [_tiny_step(n) for n in sorted(methods)]
    pairs = sorted({(a, "rtn") for a in prune} | {("magnitude", b) for b in quant})  # every method in a hybrid
    return singles + [f"{_tiny_step(a)} -> {_tiny_step(b)}" for a, b in pairs] + \
        [f"{_tiny_step(b)} -> {_tiny_step(a)}" for a, b in pairs]  # both orders


@pytest.mark.parametrize("text", _every_method_and_hybrid_order())
def test_the_exported_tensors_take_exactly_the_recorded_bytes(text, tmp_path):
    model = tiny_model()
    reference = Reference.of(model)
    pl.apply_(model, pl.parse(text), Calibration(torch.randint(0, 320, (3, 40), generator=torch.Generator()
                                                               .manual_seed(1))), 0)
    recorded = measure(model, reference).model_bytes
    manifest = packed_folder.write(model, None, tmp_path / "out", {"pipeline": text})
    assert manifest["stored_tensor_bytes"] == recorded  # to the byte: one layout serves both
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / packed.WEIGHTS), "pt") as f:
        assert sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()) == recorded


@pytest.mark.parametrize("spec", ["fp8", "fp8(scheme=w8a16, scales=tensor)", "fp8(solver=gptq)"])
def test_fp8_exports_as_float_quantized_to_exactly_the_evaluated_weights(tmp_path, spec):
    from transformers import AutoModelForCausalLM

    from compactmind.models import block_linears

    model = tiny_model()
    reference = Reference.of(model)
    pl.apply_(model, pl.parse(spec), Calibration(torch.randint(0, 320, (3, 40), generator=torch.Generator()
                                                               .manual_seed(1))), 0)
    linears = block_linears(model)
    per_tensor = "tensor" in spec
    scales = sum(1 if per_tensor else lin.out_features for _, lin in linears)
    rest = sum(p.numel() * 2 for n, p in model.named_parameters() if "layers." not in n or "norm" in n)
    assert measure(model, reference).model_bytes == sum(lin.weight.numel() for _, lin in linears) + 4 * scales + rest
    manifest = compressed_tensors.write(model, None, tmp_path / "ct", {"pipeline": spec})
    assert manifest["format"]["format"] == "float-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = next(iter(config["config_groups"].values()))
    assert scheme["weights"]["type"] == "float" and scheme["weights"]["num_bits"] == 8
    assert (scheme.get("input_activations") or {}).get("dynamic") is (True if "w8a16" not in spec else None)
