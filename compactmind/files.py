"""Writing files and folders so that a reader (or a crash) never sees half of one: everything goes to a hidden
temporary sibling, is flushed to the disk (fsync), gets the user's normal permissions (the umask, as `open`
would give; temporary files are private until then), and is renamed into place, the folder entry flushed too.
Every report, export, level and cache file compactmind writes goes through here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform without directory handles: the rename is as durable as it gets
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` whole or not at all."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_folder(out: Path, fill: Callable[[Path], None], replace: bool = False) -> None:
    """Make the folder `out` by `fill(tmp)` on a temporary sibling, then rename it into place. `out` must not
    exist or be empty (replace=True: an existing folder is swapped out and removed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        mask = _umask()
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~mask)
        _fsync_dir(tmp)
        old = None
        if out.exists():
            if replace:
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
            else:
                out.rmdir()  # empty, or this raises: never write over a folder's files
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
