"""Size accounting per DESIGN.md: every weight counts, tied weights once, formats' overheads included."""

import math

import pytest
import torch

from compactmind import pipeline as pl
from compactmind.calibration import Calibration
from compactmind.footprint import Reference, measure
from compactmind.formats import Entry, QuantParams, Sparsity, TensorFormat, stored_bytes
from compactmind.models import block_linears

from conftest import tiny_model

CALIB = Calibration(torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0)))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_dense_is_zero_and_fp16_is_exactly_half():
    model = tiny_model()
    ref = Reference.of(model)
    assert measure(model, ref).compression_ratio == 0.0
    pl.apply_(model, pl.parse("fp16"), None, 0)
    fp = measure(model, ref)
    assert fp.compression_ratio == 0.5 and fp.bits_per_weight == 16.0


def test_tied_weights_count_once():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = Reference.of(model)
    assert ref.n_weights == n_params(model)  # parameters() yields the tied tensor once
    assert measure(model, ref).model_bytes == 4 * n_params(model)


def test_int8_counts_codes_scales_and_fp16_rest():
    model = tiny_model()
    ref = Reference.of(model)
    pl.apply_(model, pl.parse("int8_sq(alpha=0.5)"), CALIB, 0)
    linears = [lin for _, lin in block_linears(model)]
    linear_bits = sum(l.weight.numel() * 8 + l.weight.shape[0] * 16 for l in linears)
    rest = n_params(model) - sum(l.weight.numel() for l in linears)
    expected_bytes = (linear_bits + rest * 16) / 8
    fp = measure(model, ref)
    assert fp.model_bytes == expected_bytes
    assert fp.compression_ratio == pytest.approx(1 - expected_bytes / (4 * n_params(model)))


def test_l2_structured_pruning_counts_removed_weights_exactly():
    model = tiny_model()
    ref = Reference.of(model)
    dense_params = n_params(model)
    pl.apply_(model, pl.parse("l2_pruning(sparsity=0.25, scope=mlp, score=weight)"), None, 0)
    removed_per_layer = 32 * 64 * 3  # 32 of 128 channels: rows of gate and up, columns of down
    assert n_params(model) == dense_params - 2 * removed_per_layer
    fp = measure(model, ref)
    assert fp.model_bytes == 4 * (dense_params - 2 * removed_per_layer)
    assert fp.sparsity == pytest.approx(2 * removed_per_layer / ref.n_block_linear_weights)


def test_unstructured_sparsity_pays_for_its_bitmap():
    w = torch.randn(64, 64)
    w[:, :32] = 0
    sparse = Entry(TensorFormat(sparsity=Sparsity.UNSTRUCTURED))
    assert stored_bytes(w, sparse, 32) == 2048 * 4 + 4096 // 8  # non-zeros + one bit per weight
    w2 = torch.randn(64, 64)
    w2[0, 0] = 0
    assert stored_bytes(w2, sparse, 32) == 4096 * 4  # the dense layout is cheaper: stay dense


def test_group_quantization_counts_packed_codes_scales_and_zero_points():
    w = torch.randn(8, 128)
    q = QuantParams(torch.ones(8, 4, dtype=torch.float16), torch.zeros(8, 4, dtype=torch.uint8))
    g = Entry(TensorFormat(bits=3, scaled=True, group_size=32, zero_point=True), q)
    assert stored_bytes(w, g, 32) == 8 * 128 * 3 // 8 + 8 * 4 * 2 + 8 * 4 * 3 // 8  # codes, FP16 scales, 3-bit zeros
    symmetric = Entry(TensorFormat(bits=3, scaled=True, group_size=32), q)
    assert stored_bytes(w, symmetric, 32) == 8 * 128 * 3 // 8 + 8 * 4 * 2


def test_nm_sparsity_stores_the_kept_half_and_a_bitmap():
    w = torch.randn(8, 128)
    w.view(8, 32, 4)[:, :, :2] = 0
    nm = Entry(TensorFormat(bits=16, sparsity=Sparsity.NM, n=2, m=4))
    assert stored_bytes(w, nm, 32) == 8 * 64 * 2 + 8 * 128 // 8


def test_random_pruning_then_int8_keeps_zeros_and_counts_both():
    model = tiny_model()
    ref = Reference.of(model)
    pl.apply_(model, pl.parse("random_pruning(sparsity=0.5) -> int8_sq(alpha=0.5)"), CALIB, 0)
    fp = measure(model, ref)
    assert fp.sparsity >= 0.5
    only_int8 = tiny_model()
    pl.apply_(only_int8, pl.parse("int8_sq(alpha=0.5)"), CALIB, 0)
    assert fp.compression_ratio > measure(only_int8, ref).compression_ratio
    assert math.isclose(1 - fp.bits_per_weight / 32, fp.compression_ratio)


def test_sparsity_is_what_pruning_removed_not_zeros_rounding_made():
    model = tiny_model()
    ref = Reference.of(model)
    pl.apply_(model, pl.parse("rtn(bits=2, group_size=32)"), None, 0)
    zeros = sum(int((lin.weight == 0).sum()) for _, lin in block_linears(model))
    assert zeros > 0 and measure(model, ref).sparsity == 0.0  # rounding made zeros; nothing was pruned
    pruned = tiny_model()
    pl.apply_(pruned, pl.parse("magnitude(sparsity=0.3) -> rtn(bits=2, group_size=32)"), None, 0)
    assert measure(pruned, ref).sparsity == pytest.approx(0.3, abs=1e-3)  # the mask, whatever rounding adds
