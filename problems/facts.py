"""Typed fact records and the dataset loaders (CounterFact, zsRE, ROME's known_1000).

Every loader reads the gzip-compressed copy vendored in ``problems/data`` (see ``problems/data/SOURCES.md``) unless
``path`` is given; a path may point to a plain ``.json`` or a ``.json.gz`` file in the same upstream schema (e.g. the
full 21,919-record ``counterfact.json``). Malformed records (missing keys, empty strings, a subject that does not
occur in its prompt) are skipped with a warning naming their id, and collected in the optional ``errors`` list as
:class:`SkippedRecord` entries; a load never crashes on a bad record.

Field mapping (targets always get a leading space, since the upstream strings have none):

* CounterFact (ROME schema): ``id = "cf:{case_id}"``, ``template = requested_rewrite.prompt``,
  ``o_true = " " + target_true.str``, ``o_false = " " + target_new.str``, ``relation = relation_id``,
  ``paraphrases = paraphrase_prompts``, ``neighborhood = neighborhood_prompts`` (their true object is ``o_true``).
* zsRE (ROME/MEND eval schema, ``src, subject, answers, alt, rephrase, loc, loc_ans``): ``id = "zsre:{index}"``,
  ``template = src`` with the first occurrence of the subject replaced by ``{}`` (as ROME's ``MENDQADataset``),
  ``o_true = " " + answers[0]`` (the gold answer; ROME edits *towards* it), ``o_false = " " + alt`` (MEND's
  alternative answer, the counterfactual target), ``relation = None``, ``paraphrases = (rephrase,)``,
  ``neighborhood = (loc + "?",)`` with ``neighborhood_answers = (" " + loc_ans,)`` (ROME appends "?" to ``loc``).
* known_1000: ``id = "known:{known_id}"``, ``template = prompt`` with the subject replaced by ``{}`` (the file's own
  ``template`` field lacks the prompt's last word for some records), ``o_true = " " + attribute``, ``o_false = None``,
  ``relation = relation_id``, no paraphrases, no neighborhood.
"""

from __future__ import annotations

import gzip
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locedit.tracer.tokens import check_template

__all__ = [
    "DATASETS",
    "Fact",
    "load_dataset",
    "SkippedRecord",
    "MalformedRecordWarning",
    "DATA_DIR",
    "load_counterfact",
    "load_zsre",
    "load_known",
    "essence_prompt",
]

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).parent / "data"


class MalformedRecordWarning(UserWarning):
    """A dataset record was skipped because it is malformed."""


def essence_prompt(subject: str) -> str:
    """The essence prompt of Meng et al. / Hase et al.: ``"{subject} is a"``."""
    return f"{subject} is a"


@dataclass(frozen=True)
class Fact:
    """One fact (s, r, o_true) with its counterfactual target and evaluation prompts.

    Attributes:
        id: ``"cf:<case_id>"``, ``"zsre:<index>"`` or ``"known:<known_id>"``.
        subject: the subject string s (occurs verbatim in the prompt).
        template: the prompt with ``"{}"`` in place of the subject.
        relation: the Wikidata relation id (``"P103"``) or None.
        o_true: the true object, with a leading space (``" French"``).
        o_false: the counterfactual object (leading space), or None where the dataset has none.
        paraphrases: full paraphrase prompts (subject wording preserved).
        neighborhood: full prompts about neighbouring subjects s* with the same relation.
        neighborhood_answers: per-neighborhood-prompt true answers where they differ from ``o_true`` (zsRE's
            ``loc_ans``), else None (CounterFact neighbours share ``o_true``).
        generation_prompts: CounterFact's prompts for free generation (Meng et al. §3.3 fluency); empty elsewhere.
    """

    id: str
    subject: str
    template: str
    relation: str | None
    o_true: str
    o_false: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] | None = None
    generation_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_template(self.template)
        except ValueError as e:
            raise ValueError(f"{self.id}: {e}") from None
        if "|" in self.id:
            raise ValueError(f"{self.id!r}: a fact id cannot contain '|' (the study's journal keys use it)")
        if not self.subject.strip():
            raise ValueError(f"{self.id}: empty subject")
        for name in ("o_true", "o_false"):
            v = getattr(self, name)
            if v is not None and not v.strip():
                raise ValueError(f"{self.id}: empty {name}")

    @property
    def prompt(self) -> str:
        """The template formatted with the subject (the rewrite prompt P = (s, r))."""
        return self.template.replace("{}", self.subject, 1)

    @property
    def essence(self) -> str:
        """``"{subject} is a"``, the prompt the essence texts are sampled from."""
        return essence_prompt(self.subject)


@dataclass(frozen=True)
class SkippedRecord:
    """A record a loader skipped: its id (or index) and why."""

    id: str
    reason: str


def _space(s: Any) -> str:
    if not isinstance(s, str) or not s.strip():
        raise ValueError(f"empty or non-string target {s!r}")
    return s if s.startswith(" ") else " " + s


def _str(rec: dict, key: str) -> str:
    v = rec[key]
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"field {key!r} is empty or not a string: {v!r}")
    return v


def _read(path: str | Path | None, default: str) -> list[dict]:
    p = Path(path) if path is not None else DATA_DIR / default
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _skip(errors: list | None, rid: str, reason: str) -> None:
    msg = f"skipping malformed record {rid}: {reason}"
    log.warning(msg)
    warnings.warn(msg, MalformedRecordWarning, stacklevel=3)
    if errors is not None:
        errors.append(SkippedRecord(rid, reason))


def _check_subject(subject: str, *prompts: str) -> None:
    for p in prompts:
        if subject not in p:
            raise ValueError(f"subject {subject!r} does not occur in prompt {p!r}")


def _cf_fact(rec: dict) -> Fact:
    rr = rec["requested_rewrite"]
    subject, template = _str(rr, "subject"), _str(rr, "prompt")
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{}}'")
    fact = Fact(
        id=f"cf:{rec['case_id']}",
        subject=subject,
        template=template,
        relation=rr.get("relation_id"),
        o_true=_space(rr["target_true"]["str"]),
        o_false=_space(rr["target_new"]["str"]),
        paraphrases=tuple(rec["paraphrase_prompts"]),
        neighborhood=tuple(rec["neighborhood_prompts"]),
        generation_prompts=tuple(str(p) for p in rec.get("generation_prompts", ())),
    )
    _check_subject(subject, *fact.paraphrases)
    return fact


def load_counterfact(
    path: str | Path | None = None, limit: int | None = None, errors: list | None = None
) -> list[Fact]:
    """CounterFact facts (vendored 3,284-record subset unless ``path``), in file order; first ``limit`` records."""
    records = _read(path, "counterfact.json.gz")
    if limit is not None:
        records = records[:limit]
    out = []
    for i, rec in enumerate(records):
        rid = f"cf:{rec.get('case_id', f'#{i}')}" if isinstance(rec, dict) else f"cf:#{i}"
        try:
            out.append(_cf_fact(rec))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            _skip(errors, rid, f"{type(e).__name__}: {e}")
    return out


def _zsre_fact(i: int, rec: dict) -> Fact:
    subject, src = _str(rec, "subject"), _str(rec, "src")
    _check_subject(subject, src)
    answers = rec["answers"]
    if not isinstance(answers, list) or not answers:
        raise ValueError("no answers")
    return Fact(
        id=f"zsre:{i}",
        subject=subject,
        template=src.replace(subject, "{}", 1),
        relation=None,
        o_true=_space(answers[0]),
        o_false=_space(rec["alt"]),
        paraphrases=(_str(rec, "rephrase"),),
        neighborhood=(_str(rec, "loc") + "?",),
        neighborhood_answers=(_space(rec["loc_ans"]),),
    )


def load_zsre(path: str | Path | None = None, errors: list | None = None) -> list[Fact]:
    """zsRE facts (vendored 1,037 records unless ``path``). Ids are ``zsre:<index in file>``.

    Note: zsRE paraphrases (``rephrase``) need not contain the subject verbatim; they are kept as they are (the
    noised-subject scoring of Fact Forcing skips paraphrases that lack the subject)."""
    out = []
    for i, rec in enumerate(_read(path, "zsre_mend_eval.json.gz")):
        try:
            out.append(_zsre_fact(i, rec))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            _skip(errors, f"zsre:{i}", f"{type(e).__name__}: {e}")
    return out


def _known_fact(rec: dict) -> Fact:
    subject, prompt = _str(rec, "subject"), _str(rec, "prompt")
    _check_subject(subject, prompt)
    return Fact(
        id=f"known:{rec['known_id']}",
        subject=subject,
        template=prompt.replace(subject, "{}", 1),
        relation=rec.get("relation_id"),
        o_true=_space(rec["attribute"]),
        o_false=None,
    )


def load_known(path: str | Path | None = None, errors: list | None = None) -> list[Fact]:
    """ROME's known_1000 facts (1,209 records unless ``path``); ``o_false`` is None."""
    out = []
    for i, rec in enumerate(_read(path, "known_1000.json.gz")):
        rid = f"known:{rec.get('known_id', f'#{i}')}" if isinstance(rec, dict) else f"known:#{i}"
        try:
            out.append(_known_fact(rec))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            _skip(errors, rid, f"{type(e).__name__}: {e}")
    return out


DATASETS = {"counterfact": load_counterfact, "zsre": load_zsre, "known": load_known}
"""The vendored datasets by name (``load_dataset`` also takes a path to a CounterFact-schema JSON)."""


def load_dataset(name: str | Path) -> list[Fact]:
    """Facts of a dataset: a :data:`DATASETS` name (``counterfact``, ``zsre``, ``known``) or a path to a
    CounterFact-schema JSON.

    Raises:
        ValueError: neither a dataset name nor an existing file.
    """
    if isinstance(name, str) and name in DATASETS:
        return DATASETS[name]()
    if Path(name).exists():
        return load_counterfact(path=name)
    raise ValueError(f"unknown dataset {str(name)!r}: use one of {tuple(DATASETS)} or a path to a CounterFact JSON")
