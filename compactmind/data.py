"""Evaluation and calibration text: reading, tokenizing once, cutting windows.

Protocol (GPTQ / SparseGPT / Wanda): the evaluation text is tokenized once, as it is on disk, with the
tokenizer's defaults, and cut into consecutive non-overlapping windows of `seq_len` tokens; an optional cap
keeps the first N windows. Calibration samples are `seq_len`-token windows drawn (under the seed) from a
separate calibration text, never from the evaluation text: --calib_path, else a train/valid file beside the
evaluation file, else the WikiText-2 validation split shipped with compactmind. Calibration samples come from the
first three quarters of that text; a dynamic study takes its selection windows from the last quarter, so
selection, calibration and evaluation never share a token (and the selection settings do not change the
calibration samples, so a level database serves every selection setting).

Without --data_path the evaluation text is the WikiText-2 raw test split shipped with compactmind (a variant
with blank lines removed; see corpora/wikitext-2/LICENSE.md). `--data_path builtin:pydoc` picks the Python
documentation topics shipped with CPython instead, an offline corpus on any machine.
"""

from __future__ import annotations

import hashlib
import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compactmind.errors import DataError

log = logging.getLogger(__name__)

CORPORA = Path(__file__).resolve().parent / "corpora"
WIKITEXT_TEST = CORPORA / "wikitext-2" / "wiki.test.raw"
WIKITEXT_VALID = CORPORA / "wikitext-2" / "wiki.valid.tokens"
WIKITEXT_LABEL = ("WikiText-2 raw test, shipped variant (blank lines removed; not the papers' '\\n\\n'.join of the "
                  "datasets split)")
PYDOC = "builtin:pydoc"
TEXT_SUFFIXES = (".txt", ".raw", ".tokens", "")
MAX_TEXT_BYTES = 2 * 2**30  # a text file larger than this is refused, not read into memory


def read_text(path: Path, what: str = "data file") -> str:
    if not path.exists():
        raise DataError(f"The {what} {path} does not exist; check --data_path / --calib_path.")
    if path.is_dir():
        raise DataError(f"The {what} {path} is a folder, expected a text file.")
    try:
        info = path.stat()
    except OSError as exc:
        raise DataError(f"The {what} {path} cannot be read ({exc.strerror}); check its permissions.") from exc
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"The {what} {path} is not a regular file (a pipe or a device); pass a text file.")
    if info.st_size > MAX_TEXT_BYTES:
        raise DataError(f"The {what} {path} has {info.st_size / 2**30:.1f} GiB, above the {MAX_TEXT_BYTES // 2**30} "
                        "GiB compactmind reads; pass a smaller text file.")
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


def _find_split(folder: Path, *names: str, exclude: Path | None = None) -> Path | None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES and p != exclude)
    for name in names:
        for p in files:
            if name in p.name.lower():
                return p
    return None


@dataclass(frozen=True)
class Sources:
    """Where the evaluation and calibration text come from (eval_path None: the pydoc topics)."""

    eval_path: Path | None
    calib_path: Path
    calib_label: str
    label: str

    def eval_text(self) -> str:
        if self.eval_path is None:
            from pydoc_data.topics import topics  # ships with CPython: an offline corpus on any machine

            return "\n\n".join(topics[k] for k in sorted(topics))
        return read_text(self.eval_path)

    def read(self) -> "Texts":
        """Read and check both texts (before any model is loaded, so bad files fail fast)."""
        texts = Texts(self, self.eval_text(), read_text(self.calib_path, "calibration file"))
        if hashlib.sha256(texts.eval.encode()).digest() == hashlib.sha256(texts.calib.encode()).digest():
            raise DataError(f"The calibration text {self.calib_path} is the evaluation text itself; calibrating on "
                            "the test text inflates every figure; pass another --calib_path.")
        return texts


@dataclass(frozen=True)
class Texts:
    sources: Sources
    eval: str
    calib: str


def _calibration(eval_path: Path | None, calib_path: str | None, folder: Path | None) -> tuple[Path, str]:
    if calib_path:
        calib = Path(calib_path).expanduser()
        if eval_path is not None and calib.exists() and calib.resolve() == eval_path.resolve():
            raise DataError(f"--calib_path {calib} is the evaluation file; calibrating on the test text inflates "
                            "every figure; pass a train or validation file.")
        return calib, f"{calib} (--calib_path)"
    sibling = _find_split(folder, "train", "valid", exclude=eval_path) if folder is not None else None
    if sibling is not None:
        return sibling, f"{sibling} (beside the evaluation file)"
    return WIKITEXT_VALID, "WikiText-2 validation split, shipped (no train/valid file beside the evaluation text)"


def resolve_sources(data_path: str | None, calib_path: str | None) -> Sources:
    if not data_path:
        return Sources(WIKITEXT_TEST, *_calibration(WIKITEXT_TEST, calib_path, None), WIKITEXT_LABEL)
    if data_path == PYDOC:
        return Sources(None, *_calibration(None, calib_path, None), f"Python pydoc topics ({PYDOC})")
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"The data path {path} does not exist; pass a text file or a folder with train/valid/test files.")
    if path.is_dir():
        test = _find_split(path, "test")
        if test is None:
            raise DataError(f"The data folder {path} holds no test text file (a name containing 'test').")
        return Sources(test, *_calibration(test, calib_path, path), str(test))
    return Sources(path, *_calibration(path, calib_path, path.parent), str(path))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Dataset:
    windows: torch.Tensor  # [n_windows, seq_len] evaluation windows, in corpus order
    calib: torch.Tensor  # [data_samples, seq_len]
    seq_len: int
    info: dict = field(default_factory=dict)
    selection: torch.Tensor | None = None  # [selection_windows, seq_len] from the calibration text (dynamic)


SELECTION_SHARE = 4  # the last quarter of the calibration text holds a dynamic study's selection windows


def prepare(tokenizer, sources: Sources | Texts, seq_len: int, data_samples: int,
            max_eval_windows: int | None = None, seed: int = 0, selection_windows: int = 0) -> Dataset:
    texts = sources if isinstance(sources, Texts) else sources.read()
    sources = texts.sources
    tokens = tokenize(tokenizer, texts.eval)
    calib_tokens = tokenize(tokenizer, texts.calib)
    split = calib_tokens.numel() - calib_tokens.numel() // SELECTION_SHARE
    pool, held_out = calib_tokens[:split], calib_tokens[split:]
    if pool.numel() < seq_len + 1 or held_out.numel() < selection_windows * seq_len:
        raise DataError(f"The calibration text {sources.calib_path} has {calib_tokens.numel()} tokens: too few for "
                        f"calibration samples of {seq_len} tokens from its first three quarters"
                        + (f" and {selection_windows} selection windows from its last quarter" if selection_windows
                           else "") + "; pass a longer --calib_path or a smaller --seq_len.")
    selection = held_out[: selection_windows * seq_len].view(selection_windows, seq_len) if selection_windows \
        else None
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, pool.numel() - seq_len + 1, (data_samples,), generator=g)
    calib = torch.stack([pool[s:s + seq_len] for s in starts.tolist()])
    available = tokens.numel() // seq_len
    if available < 1:
        raise DataError(f"The evaluation text has {tokens.numel()} tokens, fewer than one window of {seq_len}; "
                        "pass a longer file or a smaller --seq_len.")
    used = available if max_eval_windows is None else min(available, max_eval_windows)
    info = {"eval_source": str(sources.eval_path) if sources.eval_path else sources.label, "label": sources.label,
            "corpus_tokens": int(tokens.numel()), "calib_source": sources.calib_label,
            "windows_available": available, "windows": used, "eval_tokens": used * seq_len,
            "calib_samples": data_samples, "calib_tokens": int(calib.numel())}
    windows = tokens[: used * seq_len].view(used, seq_len)
    info.update(eval_ids=_digest(windows), calib_ids=_digest(calib))  # content, not paths: what a study compares
    if selection_windows:
        info.update(selection_ids=_digest(selection), selection_windows=selection_windows,
                    selection_source=f"{selection_windows} consecutive windows from the start of the calibration "
                    "text's last quarter (calibration samples come from the first three quarters)")
    return Dataset(windows, calib, seq_len, info, selection)


def _digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
