"""compactmind.ggml against gguf-py: ggml block layouts bit for bit, fitting behaviour, refusals."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from compactmind import ggml
from compactmind.errors import ConfigError

K_QUANTS = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
LEGACY = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL"]
GGUF_QUANTIZES = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]  # the legacy types gguf-py itself can quantize


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=_gen(rows * cols))


def _outliers(rows: int, cols: int) -> torch.Tensor:
    """Gaussian weights with a few large columns, one spike, an all-zero row and two constant rows."""
    g = _gen(7)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, torch.randperm(cols, generator=g)[:4]] *= 12
    w[1, 3] = 4.0
    w[2] = 0
    w[3] = 0.31
    w[4] = -0.07
    return w


def _weight_like(rows: int, cols: int) -> torch.Tensor:
    """A few rows of a [576, 1536]-like projection: small heavy-tailed weights (Student-t, 3 dof)."""
    g = _gen(11)
    normal = torch.randn(rows, cols, generator=g)
    chi2 = (torch.randn(3, rows, cols, generator=g) ** 2).sum(0)
    return 0.02 * normal / (chi2 / 3).sqrt()


CASES = {
    "random_3x256": lambda: _random(3, 256),
    "outliers_7x512": lambda: _outliers(7, 512),
    "slice_4x1536": lambda: _weight_like(4, 1536),
    "random_5x1536": lambda: _random(5, 1536),
}


def _gguf_values(data: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, ggml.TYPES[name].ggml)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_bytes_and_values_equal_gguf_bit_for_bit(name, case):
    w = CASES[case]()
    t = ggml.TYPES[name]
    grid = ggml.fit(w, name)
    codes, vals = ggml.quantize_columns(grid, w, 0)
    data = ggml.encode(grid, codes)
    assert data.dtype == np.uint8
    assert data.shape == (w.shape[0], w.shape[1] // t.block * gguf.GGML_QUANT_SIZES[t.ggml][1])
    assert data.nbytes == ggml.bytes_of(name, w.numel())
    theirs = _gguf_values(data, name)
    assert theirs.dtype == torch.float32
    assert torch.equal(ggml.values(grid, codes), theirs)
    assert torch.equal(vals, theirs)
    assert torch.equal(ggml.dequantize(data, name, w.shape[1]), theirs)
    packed, qvals = ggml.quantize(w, name)
    assert np.array_equal(packed, data) and torch.equal(qvals, theirs)
    # The fit is a real approximation: within a bound that shrinks with the bits per weight.
    rel = float(((theirs - w) ** 2).sum() / (w ** 2).sum())
    assert rel < 4.0 ** (2.0 - t.bits_per_weight)


@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_column_chunks_give_the_same_codes_as_all_columns(name):
    t = ggml.TYPES[name]
    for w, k in ((_outliers(7, 512), 1), (_weight_like(5, 1536), t.block), (_random(3, 768), 48)):
        grid = ggml.fit(w, name)
        codes, vals = ggml.quantize_columns(grid, w, 0)
        parts = [ggml.quantize_columns(grid, w[:, s:s + k], s) for s in range(0, w.shape[1], k)]
        assert parts[0][0].dtype in (torch.int16, torch.int32)
        assert torch.equal(torch.cat([p[0] for p in parts], 1), codes)
        assert torch.equal(torch.cat([p[1] for p in parts], 1), vals)


def test_columns_are_the_nearest_stored_values_under_a_fixed_grid():
    """What GPTQ relies on: for moved weights, no other code of the weight's block is closer."""
    w = _weight_like(4, 512)
    for name in ggml.TYPES:
        grid = ggml.fit(w, name, importance=torch.ones(512))
        moved = w + 0.01 * torch.randn(w.shape, generator=_gen(3))
        codes, vals = ggml.quantize_columns(grid, moved, 0)
        spec = ggml._SPECS[name]
        best = (moved - vals).abs()
        for code in range(spec.lo, spec.hi + 1):
            alt = ggml.values(grid, torch.full_like(codes, code))
            assert ((moved - alt).abs() >= best).all(), (name, code)


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_legacy_bytes_equal_gguf_py_quantizer(name):
    for make in CASES.values():
        w = make()
        ours, _ = ggml.quantize(w, name)
        theirs = gguf.quants.quantize(w.numpy(), ggml.TYPES[name].ggml)
        assert np.array_equal(ours, theirs.reshape(ours.shape)), name


def test_types_sizes_and_order():
    assert list(ggml.TYPES) == sorted(ggml.TYPES, key=lambda n: -ggml.TYPES[n].bits_per_weight)
    assert set(ggml.TYPES) == set(K_QUANTS + LEGACY)
    for name, t in ggml.TYPES.items():
        assert (t.block, t.nbytes) == gguf.GGML_QUANT_SIZES[t.ggml]
        assert t.ggml.name == name
        assert t.block % t.sub == 0
    assert ggml.TYPES["Q4_K"].nbytes == 144 and ggml.TYPES["Q4_K"].bits_per_weight == 4.5
    assert ggml.bytes_of("Q6_K", 576 * 1536) == 576 * 1536 // 256 * 210
    assert list(ggml._IQ4NL_LEVELS) == list(gguf.quants.IQ4_NL.kvalues)


def test_refusals():
    for name in K_QUANTS:
        for cols in (576, 64):
            reason = ggml.refusal(name, (4, cols))
            assert reason and name in reason and str(cols) in reason and "256" in reason
            assert reason.count(".") == 1 and reason.endswith(".")
            with pytest.raises(ConfigError, match="multiple of 256"):
                ggml.fit(torch.zeros(4, cols), name)
        assert ggml.refusal(name, (4, 1536)) is None
    for name in LEGACY:
        assert ggml.refusal(name, (4, 576)) is None
        assert ggml.refusal(name, (4, 64)) is None
        assert "32" in ggml.refusal(name, (4, 48))
    assert "2-D" in ggml.refusal("Q8_0", (4, 8, 32))
    with pytest.raises(ConfigError, match="Unknown GGUF block type"):
        ggml.refusal("Q4_X", (4, 256))
    with pytest.raises(ConfigError, match="Unknown GGUF block type"):
        ggml.fit(torch.zeros(2, 256), "q4_k")
    with pytest.raises(ConfigError, match="NaN"):
        ggml.fit(torch.full((2, 256), float("nan")), "Q4_K")
    with pytest.raises(ConfigError, match="importance"):
        ggml.fit(torch.zeros(2, 256), "Q4_K", importance=torch.ones(255))
    with pytest.raises(ConfigError):
        ggml.bytes_of("Q4_K", 576)


@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_importance_lowers_the_error_where_it_is_large(name):
    w = _weight_like(16, 512)
    hot = torch.tensor([3, 40, 77, 130, 200, 301, 402, 509])
    imp = torch.ones(512)
    imp[hot] = 1e4
    plain = ggml.quantize(w, name)[1]
    weighted = ggml.quantize(w, name, importance=imp)[1]

    def hot_error(v: torch.Tensor) -> float:
        return float(((v - w)[:, hot] ** 2).sum())

    assert hot_error(weighted) < hot_error(plain)
    assert float((imp * (weighted - w) ** 2).sum()) < float((imp * (plain - w) ** 2).sum())


def test_k_quant_error_falls_with_bits():
    g = _gen(5)
    w = torch.randn(64, 1536, generator=g) * 0.02
    w[:, torch.randperm(1536, generator=g)[:6]] *= 10
    errors = [float(((ggml.quantize(w, name)[1] - w) ** 2).mean()) for name in K_QUANTS]
    assert errors == sorted(errors) and len(set(errors)) == len(errors), errors


def test_a_gguf_file_round_trip(tmp_path):
    """The bytes go into a GGUF file as pre-quantized data and read back as the same values."""
    path = tmp_path / "m.gguf"
    w = _weight_like(8, 512)
    writer = gguf.GGUFWriter(str(path), "llama")
    expected = {}
    for name in ("Q8_0", "Q4_K", "IQ4_NL", "Q3_K"):
        data, vals = ggml.quantize(w, name)
        writer.add_tensor(f"w.{name}", data, raw_dtype=ggml.TYPES[name].ggml)
        expected[f"w.{name}"] = vals
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        assert [int(n) for n in t.shape] == [512, 8]
        back = ggml.dequantize(np.asarray(t.data), t.tensor_type.name, 512)
        assert torch.equal(back, expected[t.name])
