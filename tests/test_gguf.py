"""GGUF types as a method and as an export: the weights a trial evaluates are exactly what gguf-py reads back from
the written file, transformers loads the file to the trial's logits, and llama.cpp's recipes pick the types its
published rules say."""

import json

import numpy as np
import pytest
import torch

from compactmind import ggml
from compactmind import pipeline as pl
from compactmind.calibration import Calibration
from compactmind.cli import main
from compactmind.deploy import gguf as gguf_format
from compactmind.errors import PipelineError
from compactmind.footprint import Reference, measure
from compactmind.llamacpp import fitting, more_bits, recipe_type
from compactmind.methods._gguf import ActivationRounding
from compactmind.models import block_linears

from conftest import tiny_model

IDS = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(3))


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("spec", ["gguf(type=Q4_K)", "gguf(type=Q6_K, solver=imatrix, embeddings=Q4_0)",
                                  "gguf(type=Q3_K, solver=gptq)"])
def test_a_gguf_trial_writes_exactly_the_weights_it_evaluated(tiny_model_dir, tmp_path, spec):
    import gguf

    model, tokenizer = _load(tiny_model_dir)
    pl.apply_(model, pl.parse(spec), Calibration(torch.randint(0, 300, (3, 48))), 0)
    fp = measure(model, Reference.of(model))
    manifest = gguf_format.write(model, tokenizer, tmp_path / "g", {"pipeline": spec})
    assert manifest["stored_tensor_bytes"] == fp.model_bytes  # the accounting is the file's tensor bytes
    reader = gguf.GGUFReader(str(tmp_path / "g" / gguf_format.FILE))
    stored = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    for hf_name, p in model.state_dict().items():
        t = stored.get(names.get_name(hf_name, try_suffixes=(".weight",)))
        if t is None:
            assert hf_name == "lm_head.weight" and model.config.tie_word_embeddings
            continue
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        role = t.name.split(".")[-2]
        if role in ("attn_q", "attn_k"):  # undo llama.cpp's rotary row order
            heads = model.config.num_attention_heads if role == "attn_q" else model.config.num_key_value_heads
            values = values[np.argsort(gguf_format._rotary_rows(values.shape[0], heads))]
        assert torch.equal(values.reshape(p.shape), p.float()), hf_name
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert "F32" in kinds and kinds - {"F32"} <= set(ggml.TYPES)


def test_transformers_loads_the_gguf_file_to_the_trials_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load(tiny_model_dir)
    pl.apply_(model, pl.parse("gguf(type=Q5_K)"), None, 0)
    gguf_format.write(model, tokenizer, tmp_path / "g", {})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=gguf_format.FILE,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, model(IDS).logits, atol=1e-5)


@pytest.mark.parametrize("activations", ["float", "ggml"])
def test_a_study_of_gguf_types_exports_and_verifies_through_the_cli(tiny_model_dir, text_file, tmp_path, capsys,
                                                                    activations):
    storage = f"sqlite:///{tmp_path}/s.db"
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[run]\n[grids.gguf]\ntype = ["Q8_0", "Q4_0"]\nactivations = ["{activations}"]\n')
    assert main(["-q", "run", "--model_path", str(tiny_model_dir), "--data_path", str(text_file), "--seq_len", "64",
                 "--max_eval_windows", "2", "--data_samples", "2", "--target_ratio", "0.6", "--methods", "gguf",
                 "--study", str(grid), "--storage", storage, "--study_name", "g",
                 "--output_dir", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main(["-q", "export", "--study_name", "g", "--storage", storage, "--format", "gguf", "--out",
                 str(tmp_path / "e"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "reloaded perplexity" in out
    manifest = json.loads((tmp_path / "e" / "compactmind.json").read_text())
    assert manifest["format"]["name"] == "gguf" and (tmp_path / "e" / gguf_format.FILE).stat().st_size > 0
    # which computation --verify's reload used (on this tiny model the rounding moves perplexity by less than the
    # 1e-4 check; the reload's logits with and without it are tested below)
    assert manifest["format"]["activations"] == activations
    assert ("activations=ggml" in manifest["pipeline"]) == (activations == "ggml")  # float is the default


def test_formats_that_cannot_hold_a_trial_are_refused_by_name():
    assert "l2_pruning" in gguf_format.refusal([["l2_pruning", "fp16"]])
    assert "rtn" in gguf_format.refusal([["rtn"]])
    assert gguf_format.refusal([["gguf"]]) is None and gguf_format.refusal([["magnitude", "fp16"]]) is None
    from compactmind import deploy

    assert "--format gguf" in deploy.get("packed").impl().refusal([["gguf"]])
    assert "--format gguf" in deploy.get("compressed-tensors").impl().refusal([["gguf"]])
    with pytest.raises(PipelineError, match="last step"):
        pl.parse("gguf(type=Q4_K) -> magnitude(sparsity=0.2)")
    assert not [c for c in pl.candidates(["gguf", "magnitude"]) if c.is_hybrid]


def test_types_a_width_cannot_hold_fall_back_as_llama_cpp_does_and_the_ratio_counts_their_bytes():
    assert fitting("Q4_K", 576) == "Q5_0" and fitting("Q6_K", 576) == "Q8_0" and fitting("Q4_K", 1536) == "Q4_K"
    assert fitting("Q3_K", 64) == "Q4_0" and fitting("Q8_0", 48) == "F16"
    model = tiny_model()
    pl.apply_(model, pl.parse("gguf(type=Q4_K, embeddings=Q8_0)"), None, 0)
    expected = sum(ggml.bytes_of(fitting("Q4_K", lin.in_features), lin.weight.numel())
                   for _, lin in block_linears(model))
    expected += sum(ggml.bytes_of("Q8_0", m.weight.numel())
                    for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    expected += sum(p.numel() * 4 for n, p in model.named_parameters() if p.dim() == 1)  # norms stay F32
    assert measure(model, Reference.of(model)).model_bytes == expected


def test_llama_cpp_recipes_follow_their_published_rules():
    n = 32
    assert [i for i in range(n) if more_bits(i, n)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert recipe_type("Q4_K_M", "attn_v", 0, n, 4096) == "Q6_K" and recipe_type("Q4_K_M", "attn_v", 4, n, 4096) == \
        "Q4_K"
    assert recipe_type("Q4_K_M", "attn_q", 0, n, 4096) == "Q4_K" and recipe_type("Q4_K_M", "output", 0, n, 4096) == \
        "Q6_K"
    assert recipe_type("Q3_K_M", "attn_v", 1, n, 4096) == "Q5_K" and recipe_type("Q3_K_M", "attn_v", 2, n, 4096) == \
        "Q4_K"
    assert recipe_type("Q3_K_M", "ffn_down", 1, n, 11008 // 43 * 43) in ("Q5_K", "Q5_1")
    assert recipe_type("Q3_K_M", "attn_output", 5, n, 4096) == "Q4_K"
    assert recipe_type("Q3_K_M", "ffn_up", 5, n, 4096) == "Q3_K" and recipe_type("Q3_K_M", "ffn_up", 5, n, 576) == \
        "Q4_0"
    assert recipe_type("Q4_K_M", "output", 0, 30, 576) == "Q8_0"  # SmolLM2's 576-wide head


def test_llama_cpp_recipes_are_profiles_of_a_gguf_level_database(tmp_path):
    from compactmind.data import Dataset
    from compactmind.dynamic import open_db
    from compactmind.executor import Executor
    from compactmind.llamacpp import HF_ROLES
    from compactmind.models import LoadedModel
    from compactmind.study.profiles import recipe_profile

    model = tiny_model(num_hidden_layers=8)
    g = torch.Generator().manual_seed(5)
    data = Dataset(torch.randint(0, 320, (2, 40), generator=g), torch.randint(0, 320, (2, 40), generator=g), 40,
                   {"calib_source": "random ids", "calib_tokens": 80})
    executor = Executor(LoadedModel(model, None, "tiny", "tiny", torch.device("cpu"), torch.float32), data)
    levels = [pl.parse(f"gguf(type={t})") for t in ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K")]
    db = open_db(executor, levels, "linear", tmp_path, {"test": 1}, embeddings=True)
    for recipe in ("Q4_K_M", "Q3_K_M"):
        profile = recipe_profile(db, recipe)
        assert profile is not None
        for u, unit in enumerate(db.units):
            if unit.kind != "linear":
                continue
            stored = db.levels[profile.levels[u]].params[f"{unit.path}.weight"]["ledger"]["ggml"]
            cols = model.get_submodule(unit.path).in_features
            assert stored == recipe_type(recipe, HF_ROLES[unit.path.split(".", 3)[-1]], unit.block, 8, cols)
    executor.assemble(db, recipe_profile(db, "Q4_K_M"))
    assert measure(model, executor.reference).model_bytes == db.bytes_of(recipe_profile(db, "Q4_K_M"))


def _as_ggml_defines(x: np.ndarray, block: int) -> np.ndarray:
    """ggml's quantize_row_q8_K (block 256) and quantize_row_q8_0 (block 32) as their definitions state them, one
    block at a time, dequantized: Q8_K's iscale = -127 / (the signed largest value), codes rint(iscale * x) capped
    at 127, d = 1 / iscale in FP32; Q8_0's codes rint(x * 127 / amax), d = amax / 127 stored in FP16."""
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], block):
            v = x[r, b:b + block]
            k = int(np.argmax(np.abs(v)))
            if v[k] == 0:
                continue
            if block == 256:
                iscale = np.float32(-127) / v[k]
                out[r, b:b + block] = np.minimum(np.rint(iscale * v), 127) * (np.float32(1) / iscale)
            else:
                amax = np.abs(v[k])
                d = np.float32(np.float16(amax / np.float32(127)))
                out[r, b:b + block] = np.rint(v * (np.float32(127) / amax)) * d
    return out


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q8_0", "Q4_0"])
def test_activations_are_rounded_as_ggml_rounds_them_for_the_weights_type(type_name):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 512, generator=g) * torch.logspace(-2, 1, 512)
    x[1, :256] = 0  # an all-zero block stays zero
    rounded = ggml.round_activations(x, type_name)
    expected = _as_ggml_defines(x.numpy(), ggml.TYPES[type_name].block)
    assert np.array_equal(rounded.numpy(), expected)
    assert not torch.equal(rounded, x) and rounded.dtype == x.dtype


def _tied_k_quant_model(vocab_size=320):
    # 256-wide rows: every linear, and the tied embedding, can be a K-quant
    return tiny_model(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, tie_word_embeddings=True)


def test_a_trial_with_ggml_activations_computes_what_llama_cpp_does_and_its_export_reloads_to_it(tiny_model_dir,
                                                                                                 tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    float_model, ggml_model = _tied_k_quant_model(len(tokenizer)), _tied_k_quant_model(len(tokenizer))
    pl.apply_(float_model, pl.parse("gguf(type=Q4_K, embeddings=Q6_K)"), None, 0)
    pl.apply_(ggml_model, pl.parse("gguf(type=Q4_K, embeddings=Q6_K, activations=ggml)"), None, 0)
    for (name, a), b in zip(float_model.state_dict().items(), ggml_model.state_dict().values()):
        assert torch.equal(a, b), name  # the stored weights do not depend on the activations
    linears = [m for m in ggml_model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(any(isinstance(h, ActivationRounding) for h in m._forward_pre_hooks.values()) for m in linears)
    with torch.no_grad():
        rounded, plain = ggml_model(IDS).logits, float_model(IDS).logits
    assert not torch.allclose(rounded, plain, atol=1e-4)  # the rounding changes what is computed

    for model, name in ((float_model, "float"), (ggml_model, "ggml")):
        manifest = gguf_format.write(model, tokenizer, tmp_path / name, {})
        assert manifest["format"]["activations"] == name
    with torch.no_grad():  # transformers alone computes the float trial; with llama.cpp's rounding, the ggml one
        by_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "ggml", gguf_file=gguf_format.FILE,
                                                               dtype=torch.float32).eval()(IDS).logits
        assert torch.allclose(by_transformers, plain, atol=1e-5)
        assert torch.allclose(gguf_format.reload(tmp_path / "ggml", "cpu")(IDS).logits, rounded, atol=1e-5)
        assert torch.allclose(gguf_format.reload(tmp_path / "float", "cpu")(IDS).logits, plain, atol=1e-5)


def test_a_tied_heads_rounding_follows_the_embedding_level_a_dynamic_profile_picks(tmp_path):
    from compactmind.dynamic import Profile, open_db

    from test_dynamic import executor_for

    levels = ["gguf(type=Q8_0, activations=ggml)", "gguf(type=Q4_K, activations=ggml)"]
    executor = executor_for(_tied_k_quant_model())
    db = open_db(executor, [pl.parse(t) for t in levels], "linear", tmp_path / "levels", {"test": 1},
                 embeddings=True)
    q4 = db.labels.index(levels[1])
    embed = [u.name for u in db.units].index("embed")
    for embedding in ("Q6_K", "Q8_0"):  # the head's input in Q8_K blocks of 256, then in Q8_0 blocks of 32
        option = db.option_labels(embed).index(f"embed: {embedding}")
        executor.assemble(db, Profile(tuple(option if u == embed else q4 for u in range(len(db.units)))))
        expected = _tied_k_quant_model()
        pl.apply_(expected, pl.parse(f"gguf(type=Q4_K, embeddings={embedding}, activations=ggml)"), None, 0)
        with torch.no_grad():
            assert torch.allclose(executor.model(IDS).logits, expected(IDS).logits, atol=1e-5), embedding
