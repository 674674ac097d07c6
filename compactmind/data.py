"""Evaluation and calibration text: reading, tokenizing once, cutting windows.

Protocol (GPTQ / SparseGPT / Wanda): the evaluation text is tokenized once, as it is on disk, with the
tokenizer's defaults, and cut into consecutive non-overlapping windows of `seq_len` tokens; an optional cap
keeps the first N windows. Calibration samples are `seq_len`-token windows drawn (under the seed) from a
separate calibration text; without one, they are carved from the tail of the corpus, and that tail is excluded
from evaluation so the two never overlap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compactmind.errors import DataError

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parent.parent
SHARED_WIKITEXT_TEST = _REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SHARED_WIKITEXT_VALID = _REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
TEXT_SUFFIXES = (".txt", ".raw", ".tokens", "")


def read_text(path: Path, what: str = "data file") -> str:
    if not path.exists():
        raise DataError(f"The {what} {path} does not exist; check --data_path / --calib_path.")
    if path.is_dir():
        raise DataError(f"The {what} {path} is a folder, expected a text file.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"The {what} {path} cannot be read ({exc.strerror}); check its permissions.") from exc
    if b"\x00" in raw[:65536]:
        raise DataError(f"The {what} {path} looks binary (it contains NUL bytes); pass a UTF-8 text file.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"The {what} {path} is not UTF-8 text; pass a UTF-8 text file.") from exc
    if not text.strip():
        raise DataError(f"The {what} {path} is empty; pass a file with text in it.")
    return text


def _find_split(folder: Path, *names: str) -> Path | None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
    for name in names:
        for p in files:
            if name in p.name.lower():
                return p
    return None


@dataclass(frozen=True)
class Sources:
    """Where the evaluation and calibration text come from (calib None: carved from the evaluation corpus)."""

    eval_path: Path | None
    calib_path: Path | None
    label: str

    def eval_text(self) -> str:
        if self.eval_path is None:
            from pydoc_data.topics import topics  # ships with CPython: an offline corpus on any machine

            return "\n\n".join(topics[k] for k in sorted(topics))
        return read_text(self.eval_path)

    def read(self) -> "Texts":
        """Read and check both texts (before any model is loaded, so bad files fail fast)."""
        calib = read_text(self.calib_path, "calibration file") if self.calib_path is not None else None
        return Texts(self, self.eval_text(), calib)


@dataclass(frozen=True)
class Texts:
    sources: Sources
    eval: str
    calib: str | None


def resolve_sources(data_path: str | None, calib_path: str | None) -> Sources:
    calib = Path(calib_path).expanduser() if calib_path else None
    if calib is not None and not calib.is_file():
        raise DataError(f"The calibration file {calib} does not exist or is not a file; check --calib_path.")
    if data_path is None:
        if SHARED_WIKITEXT_TEST.is_file():
            if calib is None and SHARED_WIKITEXT_VALID.is_file():
                calib = SHARED_WIKITEXT_VALID
            return Sources(SHARED_WIKITEXT_TEST, calib, "wikitext-2-raw test (local)")
        return Sources(None, calib, "python pydoc topics (offline default)")
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"The data path {path} does not exist; pass a text file or a folder with train/valid/test files.")
    if path.is_dir():
        test = _find_split(path, "test")
        if test is None:
            raise DataError(f"The data folder {path} holds no test text file (a name containing 'test').")
        if calib is None:
            calib = _find_split(path, "train", "valid")
        return Sources(test, calib, str(path))
    return Sources(path, calib, str(path))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Dataset:
    windows: torch.Tensor  # [n_windows, seq_len] evaluation windows, in corpus order
    calib: torch.Tensor  # [data_samples, seq_len]
    seq_len: int
    info: dict = field(default_factory=dict)


def prepare(tokenizer, sources: Sources | Texts, seq_len: int, data_samples: int,
            max_eval_windows: int | None = None, seed: int = 0) -> Dataset:
    texts = sources if isinstance(sources, Texts) else sources.read()
    sources = texts.sources
    tokens = tokenize(tokenizer, texts.eval)
    info = {"eval_source": str(sources.eval_path) if sources.eval_path else sources.label, "label": sources.label,
            "corpus_tokens": int(tokens.numel())}
    if sources.calib_path is not None:
        calib_tokens = tokenize(tokenizer, texts.calib)
        if calib_tokens.numel() < seq_len + 1:
            raise DataError(f"The calibration file {sources.calib_path} has {calib_tokens.numel()} tokens, fewer "
                            f"than one window of {seq_len}; pass a longer file or a smaller --seq_len.")
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, calib_tokens.numel() - seq_len + 1, (data_samples,), generator=g)
        calib = torch.stack([calib_tokens[s:s + seq_len] for s in starts.tolist()])
        info["calib_source"] = str(sources.calib_path)
    else:
        carve = data_samples * seq_len
        if tokens.numel() < carve + seq_len:
            raise DataError(f"The data has {tokens.numel()} tokens: too few for {data_samples} calibration samples "
                            f"and one evaluation window of {seq_len}; pass a longer file, --calib_path, or a "
                            "smaller --seq_len / --data_samples.")
        calib = tokens[-carve:].view(data_samples, seq_len)
        tokens = tokens[:-carve]
        info["calib_source"] = (f"carved from the last {carve} tokens of the evaluation corpus, "
                                "which are excluded from evaluation")
    available = tokens.numel() // seq_len
    if available < 1:
        raise DataError(f"The evaluation text has {tokens.numel()} tokens, fewer than one window of {seq_len}; "
                        "pass a longer file or a smaller --seq_len.")
    used = available if max_eval_windows is None else min(available, max_eval_windows)
    windows = tokens[: used * seq_len].view(used, seq_len)
    info.update(windows_available=available, windows=used, eval_tokens=used * seq_len,
                calib_samples=data_samples, calib_tokens=int(calib.numel()))
    return Dataset(windows, calib, seq_len, info)
