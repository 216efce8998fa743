"""Crash-safe, append-only result journals.

Every finished unit of work (one fact's tracing grid, one edit outcome, one failure) is appended as one JSON line
and fsync'ed before the next unit starts. A run killed at any instant (even ``kill -9``) leaves at most one
partial last line. Readers (:func:`read_journal`) skip any line that is not a complete JSON record with a ``key`` —
a torn last line or a line garbled anywhere — and keep every valid record after it; :class:`Journal` moves such lines
to ``quarantine.jsonl`` beside the journal (with the journal's name and the line number) before appending again, so
nothing is deleted and nothing valid is lost. Each record carries a unique ``key``; readers keep the first record
per key, so no row is ever duplicated. Parquet tables are *derived* from the journals (written atomically).

A journal may also be gzip-compressed (``NAME.jsonl.gz``, written by :func:`compress_journal` for shipping a
finished or paused run): readers take both forms, writers always append to the plain ``NAME.jsonl`` beside it. A
compressed journal is read record by record: a damaged member or a truncated tail ends the readable part, every
record before it is kept, and the damage is reported like a bad line; :func:`repair_compressed` (run by writers,
never by readers) rewrites it with its intact records, keeps the damaged original as ``NAME.jsonl.gz.damaged`` and
notes it in the quarantine.

Journal names are ``TABLE.shard-I-of-N.jsonl[.gz]`` (:data:`JOURNAL_NAME`); anything else in ``journal/`` (a stray
``edits.backup.jsonl``) is no journal and is left alone. Writers refuse to write through a symbolic link.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from locedit.tracer.atomic import atomic_path, write_atomic

__all__ = ["JOURNAL_NAME", "Journal", "QUARANTINE", "SymlinkWriteError", "compress_journal", "journal_files",
           "json_default", "read_journal", "read_journals", "refuse_symlink", "repair_compressed", "scan_journal",
           "write_gzip", "write_parquet_atomic"]

QUARANTINE = "quarantine.jsonl"
JOURNAL_NAME = re.compile(r"(?P<table>\w+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.jsonl(?:\.gz)?")
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, OSError)


class SymlinkWriteError(ValueError):
    """A journal, the quarantine or a log would be written through a symbolic link (refused)."""


def refuse_symlink(path: str | Path) -> Path:
    """``path`` if neither it nor its folder is a symbolic link; else :class:`SymlinkWriteError`."""
    path = Path(path)
    for p in (path, path.parent):
        if p.is_symlink():
            raise SymlinkWriteError(f"refusing to write {path}: {p} is a symbolic link (it may point outside the run "
                                    "directory); replace it with a regular file or folder")
    return path


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None  # torn: a writer was killed mid-line
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("key"), str) else None


def scan_journal(path: str | Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """``(records, bad)``: every valid record in file order, and ``(line number, text)`` of every other line."""
    path = Path(path)
    records, bad = [], []
    if not path.exists():
        return records, bad
    i = 0
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        try:
            for i, line in enumerate(f, 1):
                rec = _parse(line)
                if rec is None:
                    bad.append((i, line.decode("utf-8", "replace").rstrip("\n")))
                else:
                    records.append(rec)
        except _GZIP_ERRORS as e:  # a damaged member or a truncated tail: what was read before it is kept
            bad.append((i + 1, f"<damaged compressed journal from here on: {type(e).__name__}: {e}>"))
    return records, bad


def repair_compressed(path: str | Path) -> int:
    """Rewrite a damaged ``NAME.jsonl.gz`` with its intact records (atomically, gzip mtime 0), keep the damaged
    original as ``NAME.jsonl.gz.damaged`` and note the damage in ``quarantine.jsonl``. Returns the number of
    damaged stretches (0: intact, nothing written)."""
    path = Path(path)
    records, bad = scan_journal(path)
    if not bad:
        return 0
    refuse_symlink(path)
    shutil.copyfile(path, path.with_name(path.name + ".damaged"))
    _quarantine(path, bad)
    _write_compressed(path, records)
    return len(bad)


def _quarantine(path: Path, bad: list[tuple[int, str]]) -> None:
    q = refuse_symlink(path.parent / QUARANTINE)
    with open(q, "a", encoding="utf-8") as f:
        for line_no, text in bad:
            f.write(json.dumps({"journal": path.name, "line": line_no, "text": text}) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Journal:
    """An append-only JSONL file of records ``{"key": ..., ...}``.

    Opening moves every bad line (torn or garbled) to ``quarantine.jsonl`` beside it and rewrites the journal with
    the valid records only (atomically). ``keys`` holds the keys already written; ``quarantined`` the number of
    lines moved at opening.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_symlink(self.path)
        records, bad = scan_journal(self.path)
        self.quarantined = len(bad)
        if bad:
            _quarantine(self.path, bad)
            write_atomic(self.path, "".join(json.dumps(r, default=json_default) + "\n" for r in records))
        self.keys: set[str] = {r["key"] for r in records}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (flush + fsync). Records whose key exists are ignored."""
        key = record["key"]
        if key in self.keys:
            return
        line = json.dumps(record, default=json_default) + "\n"
        with open(refuse_symlink(self.path), "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.keys.add(key)


def json_default(o: Any):
    """``json.dumps(default=...)`` for locedit's records: numpy / torch values via ``tolist``, tuples and sets as
    lists; anything else is a ``TypeError``."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, tuple | set | frozenset):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_journal(path: str | Path) -> Iterator[dict[str, Any]]:
    """Valid records of one journal (bad lines anywhere are skipped, see :func:`scan_journal`)."""
    yield from scan_journal(path)[0]


def _journal_order(p: Path) -> tuple:
    """Shards in name order; a compressed journal before its plain sibling (it holds the older records)."""
    return (str(p.with_name(p.name.removesuffix(".gz"))), not p.name.endswith(".gz"))


def read_journals(paths: Iterable[str | Path], skipped: list | None = None) -> list[dict[str, Any]]:
    """Records of several journals (e.g. shards), first record per key kept, in file then line order; the
    ``(path, line number)`` of every skipped bad line is appended to ``skipped`` when given."""
    seen: set[str] = set()
    out = []
    for p in sorted((Path(x) for x in paths), key=_journal_order):
        records, bad = scan_journal(p)
        if skipped is not None:
            skipped += [(str(p), n) for n, _ in bad]
        for r in records:
            if r["key"] not in seen:
                seen.add(r["key"])
                out.append(r)
    return out


def journal_files(journal_dir: str | Path, table: str = "*") -> list[Path]:
    """The journals of ``table`` (every table with "*") in a run's ``journal/`` folder, plain and compressed, sorted;
    never the quarantine file."""
    d = Path(journal_dir)
    paths = [*d.glob(f"{table}.*.jsonl"), *d.glob(f"{table}.*.jsonl.gz")]
    return sorted((p for p in paths if JOURNAL_NAME.fullmatch(p.name)), key=_journal_order)


def compress_journal(plain: str | Path, remove_plain: bool = False) -> Path:
    """Merge the plain journal ``NAME.jsonl`` into ``NAME.jsonl.gz`` (the records of both, first per key, older
    first; written atomically and byte-reproducibly: gzip mtime 0). ``remove_plain`` then deletes the plain file --
    only safe when no process appends to it (the caller holds the shard's lock). Returns the compressed file."""
    plain = Path(plain)
    packed = plain.with_name(plain.name + ".gz")
    if packed.exists():
        repair_compressed(packed)
    _write_compressed(packed, read_journals([packed, plain]))
    if remove_plain:
        plain.unlink()
    return packed


def _write_compressed(packed: Path, records: list[dict[str, Any]]) -> None:
    write_gzip(packed, "".join(json.dumps(r, default=json_default) + "\n" for r in records).encode())


def write_gzip(path: str | Path, data: bytes) -> None:
    """``data`` gzip-compressed to ``path``, atomically and byte-reproducibly (mtime 0, no file name), never through
    a symbolic link."""
    path = refuse_symlink(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(
            fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)


def write_parquet_atomic(df: pl.DataFrame, path: str | Path) -> None:
    """Write ``df`` to ``path`` so that readers see either the old file or the complete new one."""
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)
