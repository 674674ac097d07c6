"""The contract every registered method keeps, on a tiny real Llama (Optuna's shared sampler tests are the model)."""

import math

import pytest
import torch

from compactmind import pipeline as pl
from compactmind.calibration import Calibration
from compactmind.errors import CalibrationError, IncompatiblePipelineError
from compactmind.evaluate import perplexity
from compactmind.models import Snapshot
from compactmind.registry import all_methods, get_method

from conftest import tiny_model

METHODS = sorted(all_methods())
IDS = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))


def calib():
    return Calibration(torch.randint(0, 320, (3, 48), generator=torch.Generator().manual_seed(2)))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def applied(model, step: pl.Step, seed: int = 0):
    pl.apply_(model, pl.Pipeline((step,)), calib(), seed)
    return model


def first_valid_step(model, name):
    method = get_method(name)
    for params in method.grid():
        step = pl.Step(name, params)
        try:
            pl.check(model, pl.Pipeline((step,)))
            return step
        except IncompatiblePipelineError:
            continue
    pytest.fail(f"{name} has no grid point valid on the tiny model")


@pytest.mark.parametrize("name", METHODS)
def test_identity_parameters_leave_logits_unchanged(name):
    method = get_method(name)
    if method.identity is None:
        pytest.skip(f"{name} has no identity setting (every setting changes the weights)")
    model = tiny_model()
    before = logits(model)
    applied(model, pl.Step(name, method.identity))
    assert torch.equal(before, logits(model))


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_result_and_only_random_methods_depend_on_it(name):
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    step = first_valid_step(a, name)
    same = logits(applied(a, step, seed=5))
    assert torch.equal(same, logits(applied(b, step, seed=5)))
    other = logits(applied(c, step, seed=6))
    if get_method(name).random:
        assert not torch.equal(same, other)  # the seed really drives a random method
    else:
        assert torch.equal(same, other)  # and nothing else


@pytest.mark.parametrize("name", METHODS)
def test_every_grid_point_gives_finite_perplexity_or_a_clear_refusal(name):
    model = tiny_model()
    snap = Snapshot(model)
    evaluated = 0
    for params in get_method(name).grid():
        snap.restore()
        try:
            applied(model, pl.Step(name, params))
        except IncompatiblePipelineError:  # the documented refusal; anything else fails the test
            continue
        assert math.isfinite(perplexity(model, IDS).perplexity)
        evaluated += 1
    assert evaluated > 0


@pytest.mark.parametrize("name", METHODS)
def test_restore_is_exact_after_the_method(name):
    model = tiny_model()
    before_logits = logits(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_modules = [(n, type(m), m.__dict__.get("out_features"), m.__dict__.get("in_features"))
                      for n, m in model.named_modules()]
    snap = Snapshot(model)
    for params in get_method(name).grid():
        try:
            applied(model, pl.Step(name, params))
        except IncompatiblePipelineError:
            pass
        snap.restore()
    state = model.state_dict()
    assert state.keys() == before_state.keys()
    for k, v in before_state.items():
        assert state[k].shape == v.shape and state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert [(n, type(m), m.__dict__.get("out_features"), m.__dict__.get("in_features"))
            for n, m in model.named_modules()] == before_modules
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(before_logits, logits(model))


def test_restore_is_exact_after_hybrids_in_both_orders():
    model = tiny_model()
    before = logits(model)
    snap = Snapshot(model)
    for text in ["l2_pruning(sparsity=0.5, scope=both) -> int8_sq(alpha=0.5)",
                 "int8_sq(alpha=0.8) -> l2_pruning(sparsity=0.5, scope=both)",
                 "random_pruning(sparsity=0.3) -> fp16"]:
        pl.apply_(model, pl.parse(text), calib(), 0)
        assert not torch.equal(before, logits(model))
        snap.restore()
        assert torch.equal(before, logits(model))


@pytest.mark.parametrize("text", ["fp8(solver=rtn)", "fp8(solver=gptq)", "gguf(type=Q4_K, solver=rtn)",
                                  "gguf(type=Q4_K, solver=imatrix)", "gguf(type=Q4_K, solver=gptq)",
                                  "l2_pruning(sparsity=0.25, score=weight)",
                                  "l2_pruning(sparsity=0.25, score=activation)", "gptq", "rtn"])
def test_a_setting_gets_the_calibration_samples_exactly_when_it_uses_them(text):
    # The pipeline passes the samples only where `calibrates` says so, and scripts/quality.py measures the
    # other settings once, not once per calibration draw: a wrong answer either fails here or costs nothing.
    (step,) = pl.parse(text).steps
    method, model = get_method(step.method), tiny_model()
    if method.calibrates(step.params):
        with pytest.raises(CalibrationError, match="needs calibration samples"):
            method.apply_(model, step.params, None, 0)
    else:
        method.apply_(model, step.params, None, 0)
        assert not torch.equal(logits(model), logits(tiny_model()))
