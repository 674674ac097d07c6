"""Shared fixtures: a tiny real Llama built from config (with a small trained tokenizer), and a text file."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import torch


def corpus_text(n_chars: int = 120_000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


def finished_trials(db: Path, timeout: float = 5) -> int:
    """Trials finished (COMPLETE or PRUNED) in an SQLite study file another process is writing; 0 before it
    exists (or while its writer holds it locked past `timeout`). Read-only, so watching a run never takes its
    lock."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout)
        try:
            return con.execute("select count(*) from trials where state in ('COMPLETE', 'PRUNED')").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:  # not created yet
        return 0


def communicate(proc, timeout: float):
    """proc.communicate(timeout), but a child that has not ended by then first dumps every thread's stack
    (compactmind registers faulthandler on SIGUSR1) into its stderr, and the test fails showing them."""
    import signal
    import subprocess

    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        proc.kill()
        tail = err if isinstance(err, str) else (err or b"").decode(errors="replace")
        pytest.fail(f"the child did not end within {timeout} s; its stacks:\n{tail[-6000:]}")


def configurations(model_dir, methods: str) -> int:
    """How many configurations a grid study over `methods` (with hybrids) runs on the saved model: every
    candidate, less those that do the same to this model as an earlier one."""
    from transformers import AutoModelForCausalLM

    from compactmind import pipeline as pl

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return len(pl.distinct(model, pl.candidates(methods.split(",")))[0])


def default_dtype() -> str:
    """The evaluation dtype a study records when none is asked for, on this machine (float16 on a GPU)."""
    from compactmind import models

    return str(models.pick_dtype("auto", models.pick_device())).replace("torch.", "")


def tiny_config(vocab_size: int = 320, **overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama with a byte-level BPE tokenizer trained here on offline text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([corpus_text()], vocab_size=320, min_frequency=2, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    model = tiny_model(vocab_size=len(tok))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


def pytest_collection_modifyitems(config, items):
    """The real-model (slow) files first: under pytest-xdist's `--dist loadfile` a file runs on one worker, and the
    longest ones handed out last would leave the other worker idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: files keep their order


@pytest.fixture
def alone(tmp_path_factory):
    """For a test that runs several compactmind processes at once: such tests take turns across pytest-xdist's
    workers (`make test` runs two), so none of them shares the two cores with another crowd of processes."""
    from filelock import FileLock

    with FileLock(tmp_path_factory.getbasetemp().parent / "compactmind-alone.lock"):
        yield


@pytest.fixture(scope="session")
def _test_cache(tmp_path_factory) -> str:
    """The session's own cache folder, except converted GGUF models: those are keyed by the file's path, size and
    time and shared with the user's cache, so SmolLM2's 20 s conversion is paid once per machine, not per session."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    models = Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "compactmind" / "models"
    try:
        models.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "models").symlink_to(models, target_is_directory=True)
    except OSError:
        pass  # a read-only home: the session converts into its own folder
    return str(cache)


@pytest.fixture(autouse=True)
def _isolated_cache(_test_cache, monkeypatch):
    monkeypatch.setenv("COMPACTMIND_CACHE", os.environ.get("COMPACTMIND_TEST_CACHE") or _test_cache)
