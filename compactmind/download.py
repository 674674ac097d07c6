"""Downloads for users with a network: model snapshots (Hugging Face hub, ModelScope) and WikiText-2 as the
train/valid/test text files the CLI reads. The scripts under scripts/ are thin command lines over these."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from compactmind.errors import CompactMindError
from compactmind.files import atomic_write

# What the CLI needs from a model repository (weights, config, tokenizer); not the other formats many ship.
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
WIKITEXT = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
SPLITS = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}


class DownloadError(CompactMindError):
    pass


def _out_dir(path: str) -> Path:
    out = Path(path).expanduser()
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise DownloadError(f"Cannot write to {out}: {existing} is not a writable folder; pass another output folder.")
    return out


def _network_problem(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        name = type(exc).__name__
        text = str(exc)
        if any(k in name for k in ("Connect", "Timeout", "Network", "LocalEntryNotFound", "OfflineMode")) or any(
                k in text for k in ("Name or service not known", "Temporary failure in name resolution",
                                    "Max retries exceeded", "Connection refused", "internet connection")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _reachable(host: str) -> bool:
    """Whether the host can be resolved and connected to at all (the libraries would retry with backoff for half
    a minute before saying it cannot). Behind a proxy the libraries know the way: taken as reachable."""
    import socket

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((host, 443), timeout=10).close()
        return True
    except OSError:
        return False


def _unreachable(source: str, what: str) -> DownloadError:
    return DownloadError(f"Cannot reach {source} to download {what} (no network here?); download it on a "
                         "machine with access and copy the folder over.")


def _explain(exc: Exception, source: str, what: str) -> DownloadError:
    if _network_problem(exc):
        return _unreachable(source, what)
    name = type(exc).__name__
    if "GatedRepo" in name or "401" in str(exc) or "403" in str(exc):
        return DownloadError(f"{what} on {source} needs an access token with accepted terms; pass --token or set "
                             "HF_TOKEN.")
    if "RepositoryNotFound" in name or "NotExist" in name or "404" in str(exc):
        return DownloadError(f"{source} has no repository {what}; check the name.")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    return DownloadError(f"Downloading {what} from {source} failed: {first[:300]}")


def _require(module: str, extra: str = "download"):
    try:
        return __import__(module)
    except ImportError:
        raise DownloadError(f"The Python package {module} is not installed; pip install 'compactmind[{extra}]'.") \
            from None


def hub_snapshot(repo_id: str, out: str, revision: str | None = None, token: str | None = None) -> Path:
    folder = _out_dir(out)
    hub = _require("huggingface_hub")
    try:
        hub.snapshot_download(repo_id, local_dir=str(folder), revision=revision, allow_patterns=MODEL_FILES,
                              token=token or os.environ.get("HF_TOKEN"))
    except Exception as exc:
        raise _explain(exc, "the Hugging Face hub", repo_id) from None
    return folder


def modelscope_snapshot(model_id: str, out: str, revision: str | None = None) -> Path:
    folder = _out_dir(out)
    _require("modelscope")
    if not _reachable("www.modelscope.cn"):
        raise _unreachable("ModelScope", model_id)
    from modelscope import snapshot_download

    try:
        snapshot_download(model_id, local_dir=str(folder), revision=revision, allow_patterns=MODEL_FILES)
    except Exception as exc:
        raise _explain(exc, "ModelScope", model_id) from None
    return folder


def wikitext(out: str, name: str = "wikitext-2") -> list[Path]:
    """WikiText raw, each split's rows joined with "\\n\\n" (the GPTQ code's protocol), as train/valid/test.txt."""
    folder = _out_dir(out)
    datasets = _require("datasets")
    datasets.logging.disable_progress_bar()
    from urllib.parse import urlparse

    if not _reachable(urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""):
        datasets.config.HF_HUB_OFFLINE = True  # a copy in the datasets cache still serves; none fails at once
    try:
        splits = datasets.load_dataset("wikitext", WIKITEXT[name])
    except Exception as exc:
        raise _explain(exc, "the Hugging Face hub", f"the {name} dataset") from None
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split, filename in SPLITS.items():
        path = folder / filename
        atomic_write(path, "\n\n".join(splits[split]["text"]))
        written.append(path)
    return written


def run(main, argv: list[str] | None = None) -> int:
    """Run a script's main: bad arguments exit 2 (argparse), download problems print one sentence and exit 1."""
    import logging

    logging.disable(logging.ERROR)  # the libraries' retry warnings would bury our one sentence
    try:
        for line in main(argv):
            print(line)
        return 0
    except CompactMindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
