"""Atomic writes: the one "write to a temporary name, then rename" used by every cache and run-directory file.

    write_atomic(path, text_or_bytes)
    with atomic_path(path) as tmp:      # for writers that need a path (torch.save, polars.write_parquet, a folder)
        torch.save(obj, tmp)

The temporary name is unique per process and call (``.{name}.tmp-{pid}-{random}`` beside the target), so
concurrent writers never share one; it is renamed over ``path`` only when the body succeeds and is removed
(file or folder) otherwise, so a failed or killed write never leaves a partial ``path``.

Cache entries are written with a content checksum (:func:`write_checked`, ``<name>.sha256`` beside the entry) and
read back only if it matches (:func:`read_checked`): a garbled, truncated or half-written entry is logged with its
file name, removed and rebuilt by its owner — never silently used.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_path",
    "discard_checked",
    "read_checked",
    "read_checked_json",
    "read_checked_tensor",
    "write_atomic",
    "write_checked",
    "write_checked_json",
    "write_checked_tensor",
]


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (a fresh empty folder with ``directory=True``); on success rename it
    over ``path`` (a folder replaces nothing: if ``path`` exists by then the temporary one is dropped), on failure
    remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            try:
                tmp.rename(path)
            except OSError:  # another process finished the same folder first
                if not path.exists():
                    raise
                _remove(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- checked caches
def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_checked(path: str | Path, data: bytes) -> Path:
    """Write a cache entry atomically with its content checksum (``<name>.sha256`` beside it, written after it: an
    entry whose checksum is missing is treated as corrupt)."""
    path = Path(path)
    write_atomic(path, data)
    write_atomic(_sidecar(path), _digest(data))
    return path


def read_checked(path: str | Path) -> bytes | None:
    """The bytes of a cache entry if it exists and matches its checksum; otherwise None. A present but unreadable,
    truncated, garbled or unchecked entry is logged (naming the file) and removed, so the caller rebuilds it."""
    import logging

    path = Path(path)
    if not path.exists():
        _sidecar(path).unlink(missing_ok=True)
        return None
    try:
        data = path.read_bytes()
        expected = _sidecar(path).read_text().strip()
    except FileNotFoundError:
        problem = "it has no checksum: written by an older locedit, or its write was interrupted"
    except OSError as e:
        problem = f"unreadable ({e})"
    else:
        if _digest(data) == expected:
            return data
        problem = "its content does not match its checksum"
    logging.getLogger("locedit.cache").warning("cache entry %s is corrupt (%s); rebuilding it", path, problem)
    discard_checked(path)
    return None


def discard_checked(path: str | Path) -> None:
    """Remove a cache entry and its checksum (a file or a folder)."""
    path = Path(path)
    _remove(path)
    _sidecar(path).unlink(missing_ok=True)


def write_checked_json(path: str | Path, obj) -> Path:
    import json

    return write_checked(path, json.dumps(obj).encode("utf-8"))


def read_checked_json(path: str | Path):
    """The JSON value of a checked cache entry, or None (missing or corrupt: see :func:`read_checked`)."""
    import json

    data = read_checked(path)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:  # a checksum-valid entry that is not JSON: written by something else
        discard_checked(path)
        return None


def write_checked_tensor(path: str | Path, obj) -> Path:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_checked(path, buf.getvalue())


def read_checked_tensor(path: str | Path):
    """A ``torch.save``d object from a checked cache entry, or None (missing or corrupt)."""
    import io

    import torch

    data = read_checked(path)
    if data is None:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
