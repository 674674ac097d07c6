import pytest

from compactmind import pipeline as pl
from compactmind.errors import IncompatiblePipelineError, PipelineError, RegistryError
from compactmind.registry import Kind, all_methods, get_method


def test_text_round_trips():
    text = "l2_pruning(sparsity=0.2, scope=mlp) -> int8_sq(alpha=0.5)"
    p = pl.parse(text)
    assert str(p) == text and p.shape == "l2_pruning -> int8_sq" and p.is_hybrid
    assert pl.parse(str(p)) == p
    assert str(pl.parse("fp16")) == "fp16"
    assert str(pl.parse("l2_pruning(sparsity=0.25)")) == "l2_pruning(sparsity=0.25, scope=mlp)"  # defaults filled


@pytest.mark.parametrize("bad, message", [
    ("l2_pruning(sparsity=0.2", "Cannot parse"),
    ("magic(x=1)", "Unknown method"),
    ("l2_pruning(amount=0.2)", "no parameter 'amount'"),
    ("l2_pruning(sparsity=abc)", "bad value"),
    ("l2_pruning(sparsity=1.5)", r"sparsity must be in \[0, 1\)"),
    ("l2_pruning(scope=rows)", "bad value"),
    ("fp16 -> fp16", "same method twice"),
])
def test_bad_pipeline_text_is_refused_clearly(bad, message):
    with pytest.raises(PipelineError, match=message):
        pl.parse(bad)


def test_grid_count_equals_enumerated_candidates():
    methods = all_methods()
    sizes = {n: m.grid_size() for n, m in methods.items()}
    prune = sum(s for n, s in sizes.items() if methods[n].kind == Kind.PRUNING and methods[n].hybrid)
    quant = sum(s for n, s in sizes.items() if methods[n].kind == Kind.QUANTIZATION and methods[n].hybrid)
    cands = pl.candidates()
    assert len(cands) == sum(sizes.values()) + 2 * prune * quant
    assert len({str(c) for c in cands}) == len(cands)  # no duplicates
    singles = [c for c in cands if not c.is_hybrid]
    assert cands[: len(singles)] == singles  # singles first, then hybrids


def test_method_subset_and_study_grids():
    grids = {"random_pruning": {"sparsity": [0.05, 0.15]}, "int8_sq": {"alpha": [0.6]}}
    cands = pl.candidates(["random_pruning", "int8_sq"], True, grids)
    assert [str(c) for c in cands] == [
        "random_pruning(sparsity=0.05)", "random_pruning(sparsity=0.15)", "int8_sq(alpha=0.6)",
        "random_pruning(sparsity=0.05) -> int8_sq(alpha=0.6)", "random_pruning(sparsity=0.15) -> int8_sq(alpha=0.6)",
        "int8_sq(alpha=0.6) -> random_pruning(sparsity=0.05)", "int8_sq(alpha=0.6) -> random_pruning(sparsity=0.15)"]
    assert len(pl.candidates(["random_pruning", "int8_sq"], False, grids)) == 3
    with pytest.raises(IncompatiblePipelineError, match="sparsity must be"):
        pl.candidates(["random_pruning"], True, {"random_pruning": {"sparsity": [2.0]}})
    with pytest.raises(RegistryError, match="Unknown method"):
        pl.candidates(["random_pruning", "nope"])


def test_flat_params_name_each_step_parameter():
    p = pl.parse("random_pruning(sparsity=0.1) -> int8_sq(alpha=0.65)")
    assert p.flat_params() == {"pipeline": "random_pruning -> int8_sq", "random_pruning.sparsity": 0.1,
                               "int8_sq.alpha": 0.65, "int8_sq.smooth": True}
    assert get_method("int8_sq").needs_calibration
