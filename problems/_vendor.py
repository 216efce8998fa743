"""Re-create ``problems/data/*.json.gz`` from the shared raw copies (run once by a maintainer).

    python -m locedit.problems._vendor SHARED_DATA_DIR     # e.g. the project's ../shared/data

Transformations (documented in ``problems/data/SOURCES.md``): records are kept verbatim and in order, except that
zsRE records lose EasyEdit's extra ``portability`` key (giving ROME's ``zsre_mend_eval.json`` schema). JSON is
minified (``separators=(",", ":")``, ``ensure_ascii=False``) and gzip-compressed at level 9 with mtime 0, so the
output bytes are reproducible.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
FILES = {
    "counterfact_subset.json": "counterfact.json.gz",
    "zsre_mend_eval_portability_gpt4.json": "zsre_mend_eval.json.gz",
    "known_1000.json": "known_1000.json.gz",
}


def vendor(src_dir: str | Path) -> None:
    src_dir = Path(src_dir)
    for src, dst in FILES.items():
        records = json.loads((src_dir / src).read_text(encoding="utf-8"))
        if src.startswith("zsre"):
            records = [{k: v for k, v in r.items() if k != "portability"} for r in records]
        raw = json.dumps(records, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        with open(DATA_DIR / dst, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=9, mtime=0,
                                                              filename="") as gz:
            gz.write(raw)
        print(f"{src} -> {dst}: {len(records)} records, {(DATA_DIR / dst).stat().st_size} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m locedit.problems._vendor SHARED_DATA_DIR (the folder holding the raw copies)")
    vendor(sys.argv[1])
