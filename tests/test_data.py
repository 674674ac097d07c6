import pytest
import torch

from compactmind import data as D
from compactmind.config import RunConfig
from compactmind.errors import ConfigError, DataError


class CharTokenizer:
    """A real (if trivial) tokenizer: one id per character, with the HF call signature."""

    def __call__(self, text, verbose=False):
        return {"input_ids": [ord(c) % 251 for c in text]}


def test_windows_are_consecutive_and_calibration_is_carved_from_the_excluded_tail(tmp_path):
    f = tmp_path / "t.txt"
    text = "".join(chr(97 + i % 26) for i in range(1000))
    f.write_text(text)
    ds = D.prepare(CharTokenizer(), D.resolve_sources(str(f), None), seq_len=100, data_samples=2)
    tokens = torch.tensor([ord(c) % 251 for c in text])
    assert ds.windows.shape == (8, 100)  # (1000 - 2*100) // 100
    assert torch.equal(ds.windows.flatten(), tokens[:800])
    assert torch.equal(ds.calib.flatten(), tokens[800:])
    assert "excluded from evaluation" in ds.info["calib_source"]


def test_window_cap_keeps_the_first_windows(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("x" * 2000)
    ds = D.prepare(CharTokenizer(), D.resolve_sources(str(f), None), 100, 1, max_eval_windows=3)
    assert ds.windows.shape == (3, 100) and ds.info["windows_available"] == 19 and ds.info["windows"] == 3


def test_separate_calibration_file_leaves_all_eval_tokens(tmp_path):
    (tmp_path / "test.txt").write_text("a" * 1000)
    (tmp_path / "train.txt").write_text("b" * 500)
    src = D.resolve_sources(str(tmp_path), None)
    assert src.eval_path.name == "test.txt" and src.calib_path.name == "train.txt"
    ds = D.prepare(CharTokenizer(), src, 100, 4, seed=1)
    assert ds.windows.shape == (10, 100) and ds.calib.shape == (4, 100)
    assert (ds.calib == ord("b") % 251).all()


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"   \n\n", "empty"), (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa", "not UTF-8")])
def test_unusable_files_are_refused(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        D.prepare(CharTokenizer(), D.resolve_sources(str(f), None), 10, 1)


def test_too_short_and_missing_inputs(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("abc")
    with pytest.raises(DataError, match="too few"):
        D.prepare(CharTokenizer(), D.resolve_sources(str(f), None), 100, 1)
    with pytest.raises(DataError, match="does not exist"):
        D.resolve_sources(str(tmp_path / "nope.txt"), None)
    with pytest.raises(DataError, match="no test"):
        D.resolve_sources(str(tmp_path), None)
    with pytest.raises(ConfigError, match="data_samples"):
        RunConfig(data_samples=0)  # settings are validated once, in RunConfig


def test_default_corpus_is_available_offline():
    src = D.resolve_sources(None, None)
    assert len(src.eval_text()) > 100_000
