"""``locedit tuning-doc``: the generated tables of ``docs/TUNING.md`` -- what ``locedit tune --install`` put in the
model profiles' tuned tables (``tracer/data/tuned/<family>.json``), rendered from those files alone, so the document
and the values the editors run with cannot drift apart.

``docs/TUNING.md`` is prose written around generated blocks (the block syntax of :mod:`locedit.findings`)::

    <!-- tuning:smollm2-chosen -->
    ... replaced by :func:`tuning_blocks`["smollm2-chosen"] ...
    <!-- /tuning:smollm2-chosen -->

Per family with a tuned table, three blocks:

- ``<family>-chosen``: one row per tuned problem × method -- the chosen overrides, their mean rewrite / paraphrase /
  neighborhood, whether the rule admitted any point (``within_rule``) and whether the optimizer budget was searched
  (``widened``), layer, number of facts and date;
- ``<family>-grids``: every measured grid point of every entry (its provenance table), the chosen one in bold, with
  whether the entry's rule admits it (:func:`locedit.tuning.admissible_rows`);
- ``<family>-layers``: the layer sweep behind the profile's default edit layer (``edit_layer``), or a line saying
  there is none.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl

from locedit.findings import _md, update_document
from locedit.stats.tables import METHOD_LABELS, METHOD_ORDER, PROBLEM_LABELS, PROBLEM_ORDER
from locedit.tracer.atomic import write_atomic
from locedit.tracer.profiles import TUNED_DIR, read_tuned_table
from locedit.tuning import TuningRule, admissible_rows, choose_layer

__all__ = ["TUNING_BLOCK_KINDS", "tuning_blocks", "write_tuning_doc"]

TUNING_BLOCK_KINDS = ("chosen", "grids", "layers")
"""The blocks generated per family: ``<family>-<kind>``."""

_PREFIX = "tuning"


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _value(x: Any) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) >= 1:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


def _point(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_value(v)}" for k, v in sorted(overrides.items())) or "(the base)"


def _label(entry: dict[str, Any]) -> str:
    return (f"{PROBLEM_LABELS.get(entry['problem'], entry['problem'])} × "
            f"{METHOD_LABELS.get(entry['method'], entry['method'])}")


def _order(entry: dict[str, Any]) -> tuple[int, int]:
    """The paper's order (problems, then FT-1, FT-5, ROME, MEMIT, ...), as every other table."""
    return (PROBLEM_ORDER.index(entry["problem"]) if entry["problem"] in PROBLEM_ORDER else len(PROBLEM_ORDER),
            METHOD_ORDER.index(entry["method"]) if entry["method"] in METHOD_ORDER else len(METHOD_ORDER))


def _chosen_block(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "No problem × method is tuned for this model yet: every editor runs with its base (GPT-J's App. A).\n"
    rows = []
    for e in entries:
        prov = e.get("provenance", {})
        rows.append([_label(e), _point(e["overrides"]), _num(e.get("rewrite_mean")), _num(e.get("paraphrase_mean")),
                     _num(e.get("neighborhood_mean")), "yes" if e.get("within_rule", True) else "**no**",
                     "yes" if e.get("widened") else "no", str(prov.get("layer", "–")), str(len(prov.get("facts", []))),
                     str(prov.get("date", "–"))])
    return _md(["problem × method", "chosen", "mean rewrite", "paraphrase", "neighborhood", "within the rule",
                "budget widened", "layer", "facts", "date"], rows, right_from=2)


def _grid_block(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "(no tuned entries)\n"
    parts = []
    for e in entries:
        prov = e.get("provenance", {})
        table = prov.get("table") or []
        if not table:
            parts.append(f"**{_label(e)}**: no measured grid in its provenance.\n")
            continue
        rule = TuningRule(**prov["rule"]) if isinstance(prov.get("rule"), dict) else TuningRule()
        frame = pl.DataFrame(table, infer_schema_length=None)
        ok = set(admissible_rows(frame, rule))
        fields = sorted({k for r in table for k in json.loads(r["point"])})
        heldout = any(r.get("rewrite_heldout_noise_mean") is not None
                      and not math.isnan(r["rewrite_heldout_noise_mean"]) for r in table)
        chosen = json.dumps({k: e["overrides"][k] for k in sorted(e["overrides"])}, sort_keys=True)
        rows = []
        for i, r in enumerate(table):
            point = json.loads(r["point"])
            cells = [r.get("stage", "–"), *(_value(point[f]) if f in point else "·" for f in fields), str(r.get("n", "–")),
                     f"{_num(r.get('rewrite_mean'))} ({_num(r.get('rewrite_sd'))})",
                     *([_num(r.get("rewrite_heldout_noise_mean"))] if heldout else []),
                     _num(r.get("paraphrase_mean")), _num(r.get("neighborhood_mean")),
                     _num(r.get("opt_p_target_mean")), _num(r.get("opt_steps_mean"), 1),
                     _num(r.get("edit_seconds_mean"), 1), "yes" if i in ok else "no"]
            if r["point"] == chosen:
                cells = [f"**{c}**" for c in cells]
            rows.append(cells)
        header = ["stage", *fields, "n", "mean rewrite (sd)", *(["on unseen draws"] if heldout else []), "paraphrase",
                  "neighborhood", "p(target) at the optimisation's end", "steps taken", "s / edit", "admissible"]
        facts = prov.get("facts", [])
        span = f"{facts[0]} … {facts[-1]}" if facts else "–"
        parts.append(f"**{_label(e)}** at layer {prov.get('layer', '–')}, {len(facts)} facts ({span}), rule: rewrite "
                     f"≤ {rule.ceiling:g}, neighborhood within {rule.neighborhood_tolerance:g} of the grid's best, "
                     f"widen below {rule.reach:g}; chosen: {_point(e['overrides'])}"
                     f"{'' if e.get('within_rule', True) else ' (no point admissible: the lowest rewrite)'}.\n\n"
                     + _md(header, rows, right_from=1 + len(fields)))
    return "\n".join(parts)


def _layers_block(layer: dict[str, Any] | None) -> str:
    if layer is None:
        return ("No layer sweep is installed: the default edit layer is the profile's (GPT-J's layer 5 of 28, "
                "scaled, unless the profile sets one).\n")
    prov = layer.get("provenance", {})
    table = prov.get("table") or []
    rule = TuningRule(**prov["rule"]) if prov.get("rule") else TuningRule()  # sweeps before the rule was recorded
    admissible = choose_layer(pl.DataFrame(table).select("layer", "rewrite_mean", "neighborhood_mean"), rule)[1] \
        if table else []
    rows = []
    for r, ok in zip(table, admissible):
        best = r["layer"] == layer["layer"]
        diff, p = r.get("diff_vs_best"), r.get("p_vs_best_holm")
        if best:
            vs = "best"
        elif diff is None or p is None:
            vs = "–"
        else:
            vs = f"{diff:+.3f} ({'< 0.001' if p < 1e-3 else f'{p:.3f}'})"
        cells = [str(r["layer"]), f"{_num(r.get('rewrite_mean'))} [{_num(r.get('ci_low'))}, {_num(r.get('ci_high'))}]",
                 _num(r.get("paraphrase_mean")), _num(r.get("neighborhood_mean")), "yes" if ok else "no", vs,
                 "yes" if r.get("indistinguishable") or best else "no", str(r.get("trace_peaks", "–"))]
        if r["layer"] == layer["layer"]:
            cells = [f"**{c}**" for c in cells]
        rows.append(cells)
    peaks = prov.get("peak_layers")
    facts = prov.get("facts", [])
    head = (f"{METHOD_LABELS.get(layer.get('method'), layer.get('method'))} × "
            f"{PROBLEM_LABELS.get(layer.get('problem'), layer.get('problem'))} on {len(facts)} facts "
            f"({prov.get('date', '–')}); chosen: **layer {layer['layer']}** (the layer rule: the highest mean rewrite "
            f"among the layers that reach {_value(rule.reach)} with neighborhood within "
            f"{_value(rule.neighborhood_tolerance)} of the best of them; `admissible`); not distinguishable from it in "
            f"rewrite (paired t-test, Holm): {', '.join(map(str, layer.get('indistinguishable', [])))}."
            + (f" Where the facts' Causal Tracing (MLP, window 5) peaks: {', '.join(map(str, sorted(peaks)))}."
               if peaks else "") + "\n\n")
    return head + _md(["layer", "mean rewrite [95% CI]", "paraphrase", "neighborhood", "admissible", "vs best (Holm p)",
                       "not distinguishable", "tracing peaks here"], rows)


def tuning_blocks(tuned_dir: str | Path = TUNED_DIR) -> dict[str, str]:
    """Every generated block of the tuning document, from the tuned tables in ``tuned_dir`` (one per family)."""
    blocks: dict[str, str] = {}
    for path in sorted(Path(tuned_dir).glob("*.json")):
        table = read_tuned_table(path)
        family = table.get("family") or path.stem
        entries = sorted(table.get("entries", []), key=_order)
        blocks[f"{family}-chosen"] = _chosen_block(entries)
        blocks[f"{family}-grids"] = _grid_block(entries)
        blocks[f"{family}-layers"] = _layers_block(table.get("edit_layer"))
    return blocks


def write_tuning_doc(doc: str | Path, *, tuned_dir: str | Path = TUNED_DIR, check: bool = False) -> bool:
    """Regenerate ``doc``'s ``<!-- tuning:... -->`` blocks from the tuned tables; with ``check`` write nothing.
    Returns whether ``doc`` was already up to date.

    Raises:
        FileNotFoundError: no document; ValueError: a block the tuned tables do not produce.
    """
    doc = Path(doc)
    if not doc.is_file():
        raise FileNotFoundError(f"no tuning document {doc}")
    text = doc.read_text(encoding="utf-8")
    new = update_document(text, tuning_blocks(tuned_dir), prefix=_PREFIX)
    if not check and new != text:
        write_atomic(doc, new)
    return new == text
