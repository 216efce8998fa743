"""Crash-safe, append-only result journals.

Every finished unit of work (one fact's tracing grid, one edit outcome, one failure) is appended as one JSON line
and fsync'ed before the next unit starts. A run killed at any instant (even ``kill -9``) leaves at most one
partial last line, which :func:`read_journal` drops (and :class:`Journal` truncates before appending again).
Each record carries a unique ``key``; readers keep the first record per key, so no row is ever duplicated.
Parquet tables are *derived* from the journals (atomically, via a temporary file and ``os.replace``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from tracer.atomic import atomic_path

__all__ = ["Journal", "read_journal", "read_journals", "write_parquet_atomic"]


def _valid_prefix_length(path: Path) -> int:
    """Byte length of the file's longest prefix made of complete lines that parse as JSON."""
    good = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            good += len(line)
    return good


class Journal:
    """An append-only JSONL file of records ``{"key": ..., ...}``.

    Opening repairs a torn tail left by a killed writer. ``keys`` holds the keys already written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            size = self.path.stat().st_size
            good = _valid_prefix_length(self.path)
            if good < size:
                with open(self.path, "r+b") as f:
                    f.truncate(good)
        self.keys: set[str] = {r["key"] for r in read_journal(self.path)}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (flush + fsync). Records whose key exists are ignored."""
        key = record["key"]
        if key in self.keys:
            return
        line = json.dumps(record, default=_json_default) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.keys.add(key)


def _json_default(o: Any):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, tuple | set | frozenset):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_journal(path: str | Path) -> Iterator[dict[str, Any]]:
    """Complete records of one journal (a torn last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return


def read_journals(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Records of several journals (e.g. shards), first record per key kept, in file then line order."""
    seen: set[str] = set()
    out = []
    for p in sorted(Path(x) for x in paths):
        for r in read_journal(p):
            if r["key"] not in seen:
                seen.add(r["key"])
                out.append(r)
    return out


def write_parquet_atomic(df: pl.DataFrame, path: str | Path) -> None:
    """Write ``df`` to ``path`` so that readers see either the old file or the complete new one."""
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)
