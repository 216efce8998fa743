"""Atomic writes: the one "write to a temporary name, then rename" used by every cache and run-directory file.

    write_atomic(path, text_or_bytes)
    with atomic_path(path) as tmp:      # for writers that need a path (torch.save, polars.write_parquet, a folder)
        torch.save(obj, tmp)

The temporary name is unique per process and call (``.{name}.tmp-{pid}-{random}`` beside the target), so
concurrent writers never share one; it is renamed over ``path`` only when the body succeeds and is removed
(file or folder) otherwise, so a failed or killed write never leaves a partial ``path``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_atomic"]


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
