import pytest
import torch

from compactmind import data as D
from compactmind.config import RunConfig
from compactmind.errors import ConfigError, DataError


class CharTokenizer:
    """A real (if trivial) tokenizer: one id per character, with the HF call signature."""

    def __call__(self, text, verbose=False):
        return {"input_ids": [ord(c) % 251 for c in text]}


def test_windows_are_consecutive_and_calibration_never_comes_from_the_evaluation_text(tmp_path):
    f = tmp_path / "t.txt"
    text = "".join(chr(97 + i % 26) for i in range(1000))
    f.write_text(text)
    src = D.resolve_sources(str(f), None)
    assert src.calib_path == D.WIKITEXT_VALID and "shipped" in src.calib_label  # nothing beside it: the shipped split
    ds = D.prepare(CharTokenizer(), src, seq_len=100, data_samples=2)
    tokens = torch.tensor([ord(c) % 251 for c in text])
    assert ds.windows.shape == (10, 100)  # every test token is evaluated: nothing carved off
    assert torch.equal(ds.windows.flatten(), tokens)
    valid = D.WIKITEXT_VALID.read_text(encoding="utf-8")
    assert ds.calib.shape == (2, 100)
    for row in ds.calib:
        assert "".join(chr(int(t)) for t in row) in "".join(chr(ord(c) % 251) for c in valid)


def test_a_train_or_valid_file_beside_the_evaluation_file_is_the_calibration_text(tmp_path):
    (tmp_path / "my_test.txt").write_text("a" * 1000)
    (tmp_path / "my_valid.txt").write_text("b" * 1000)
    src = D.resolve_sources(str(tmp_path / "my_test.txt"), None)
    assert src.calib_path == tmp_path / "my_valid.txt" and "beside" in src.calib_label


def test_the_evaluation_text_is_refused_as_calibration_text(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("x" * 1000)
    with pytest.raises(DataError, match="is the evaluation file"):
        D.resolve_sources(str(f), str(f))
    copy = tmp_path / "copy.txt"
    copy.write_text("x" * 1000)
    with pytest.raises(DataError, match="is the evaluation text itself"):
        D.resolve_sources(str(f), str(copy)).read()


def test_selection_windows_and_calibration_samples_never_share_a_token(tmp_path):
    (tmp_path / "test.txt").write_text("a" * 1000)
    (tmp_path / "valid.txt").write_text("".join(chr(97 + i % 26) for i in range(4000)))
    src = D.resolve_sources(str(tmp_path), None)
    ds = D.prepare(CharTokenizer(), src, 100, 8, seed=3, selection_windows=4)
    valid = torch.tensor([ord(c) % 251 for c in (tmp_path / "valid.txt").read_text()])
    assert torch.equal(ds.selection.flatten(), valid[3000:3400])  # the start of the last quarter
    pool = valid[:3000].tolist()
    for row in ds.calib.tolist():  # each sample is a window of the first three quarters
        assert any(pool[i:i + 100] == row for i in range(len(pool) - 99))
    plain = D.prepare(CharTokenizer(), src, 100, 8, seed=3)
    assert plain.selection is None and torch.equal(plain.calib, ds.calib)  # selection leaves calibration alone


def test_window_cap_keeps_the_first_windows(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("x" * 2000)
    ds = D.prepare(CharTokenizer(), D.resolve_sources(str(f), None), 100, 1, max_eval_windows=3)
    assert ds.windows.shape == (3, 100) and ds.info["windows_available"] == 20 and ds.info["windows"] == 3


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
    with pytest.raises(DataError, match="fewer than one window"):
        D.prepare(CharTokenizer(), D.resolve_sources(str(f), None), 100, 1)
    with pytest.raises(DataError, match="does not exist"):
        D.resolve_sources(str(tmp_path / "nope.txt"), None)
    with pytest.raises(DataError, match="no test"):
        D.resolve_sources(str(tmp_path), None)
    with pytest.raises(ConfigError, match="data_samples"):
        RunConfig(data_samples=0)  # settings are validated once, in RunConfig


def test_default_corpus_is_the_shipped_wikitext_and_pydoc_is_an_explicit_choice():
    src = D.resolve_sources(None, None)
    assert src.eval_path == D.WIKITEXT_TEST and "shipped variant" in src.label
    assert src.eval_text().startswith(" = Robert Boulter = ")
    pydoc = D.resolve_sources(D.PYDOC, None)
    assert pydoc.eval_path is None and len(pydoc.eval_text()) > 100_000


def test_pipes_and_devices_are_refused_without_reading(tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(DataError, match="not a regular file"):
            D.resolve_sources(str(path), None).read()
