"""Dataset loaders: record counts, field mapping, malformed records (no model needed)."""

import dataclasses
import gzip
import json
import warnings

import pytest

from locedit.problems import Fact, MalformedRecordWarning, load_counterfact, load_known, load_zsre


def _quiet(fn, **kw):
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a malformed vendored record would fail here
        facts = fn(errors=errors, **kw)
    return facts, errors


def test_counterfact_vendored_counts_and_mapping():
    facts, errors = _quiet(load_counterfact)
    assert len(facts) == 3284 and errors == []  # every vendored record is well-formed
    assert len({f.id for f in facts}) == 3284
    f = facts[0]
    assert f.id == "cf:0" and f.subject == "Danielle Darrieux" and f.relation == "P103"
    assert f.template == "The mother tongue of {} is" and f.prompt == "The mother tongue of Danielle Darrieux is"
    assert f.o_true == " French" and f.o_false == " English"
    assert len(f.paraphrases) == 2 and len(f.neighborhood) == 10 and f.neighborhood_answers is None
    assert f.essence == "Danielle Darrieux is a"
    assert all(x.o_true.startswith(" ") and x.o_false.startswith(" ") for x in facts)
    assert len(load_counterfact(limit=5)) == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.subject = "x"


def test_zsre_and_known_counts_and_mapping():
    z, ze = _quiet(load_zsre)
    assert len(z) == 1037 and ze == []
    assert z[0] == Fact(
        id="zsre:0",
        subject="IAAF Combined Events Challenge",
        template="When was the inception of {}?",
        relation=None,
        o_true=" 1998",
        o_false=" 2006",
        paraphrases=("When was the IAAF Combined Events Challenge launched?",),
        neighborhood=("nq question: what is the name of the last episode of spongebob?",),
        neighborhood_answers=(" The String",),
    )
    k, ke = _quiet(load_known)
    assert len(k) == 1209 and ke == []
    assert k[0].id == "known:0" and k[0].prompt == "Vinson Massif is located in the continent of"
    assert k[0].o_true == " Antarctica" and k[0].o_false is None and k[0].paraphrases == ()


def _cf_record(case_id, subject="Danielle Darrieux", prompt="The mother tongue of {} is"):
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": prompt,
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": subject,
        },
        "paraphrase_prompts": [f"{subject} spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    }


@pytest.mark.parametrize("gz", [False, True])
def test_malformed_records_are_skipped_with_their_id(tmp_path, gz, caplog):
    bad_missing = _cf_record(7)
    del bad_missing["requested_rewrite"]["target_true"]
    bad_subject = _cf_record(8)
    bad_subject["paraphrase_prompts"] = ["Someone else spoke the language"]  # subject not in the prompt
    records = [_cf_record(1), bad_missing, bad_subject, _cf_record(9, prompt="no placeholder"), "junk"]
    path = tmp_path / ("cf.json.gz" if gz else "cf.json")
    raw = json.dumps(records).encode()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    errors = []
    with pytest.warns(MalformedRecordWarning) as rec:
        facts = load_counterfact(path, errors=errors)
    assert [f.id for f in facts] == ["cf:1"]
    assert [e.id for e in errors] == ["cf:7", "cf:8", "cf:9", "cf:#4"]
    assert "target_true" in errors[0].reason and "does not occur" in errors[1].reason
    messages = " ".join(str(w.message) for w in rec)
    assert "cf:7" in messages and "cf:8" in messages and "cf:9" in messages
    assert "skipping malformed record cf:7" in caplog.text


def test_malformed_zsre_and_known(tmp_path):
    z = [{"subject": "X", "src": "Where is Y?", "answers": ["a"], "alt": "b", "rephrase": "r", "loc": "l",
          "loc_ans": "m"}]
    (tmp_path / "z.json").write_text(json.dumps(z))
    errors = []
    with pytest.warns(MalformedRecordWarning, match="zsre:0"):
        assert load_zsre(tmp_path / "z.json", errors=errors) == []
    assert errors[0].id == "zsre:0"
    k = [{"known_id": 3, "subject": "A", "attribute": "B", "prompt": "A is in", "relation_id": "P1"},
         {"known_id": 4, "subject": "A", "prompt": "A is in"}]
    (tmp_path / "k.json").write_text(json.dumps(k))
    with pytest.warns(MalformedRecordWarning, match="known:4"):
        facts = load_known(tmp_path / "k.json")
    assert [f.id for f in facts] == ["known:3"] and facts[0].template == "{} is in"


def test_edit_noise_is_a_prefix_of_the_scoring_noise():
    """Fact Forcing's ``edit_samples``: the edit optimizes over the first k samples of the very draw it is scored on."""
    import torch

    from locedit.tracer.corruption import GaussianNoise

    full = GaussianNoise(sigma=0.5, samples=10, seed=3)
    sub = full.prefix(3)
    assert sub.samples == 3
    assert torch.equal(sub.draw(4, 16), full.draw(4, 16)[:3])
    assert full.prefix(None) is full and full.prefix(10) is full
    with pytest.raises(ValueError):
        full.prefix(0)
    with pytest.raises(ValueError):
        GaussianNoise(sigma=0.5, samples=4, of=2)


def test_first_passing_is_ordered_and_lazy():
    from locedit.problems.filters import first_passing

    facts = load_counterfact(limit=10)
    calls = []

    def every_other(model, part):
        calls.append(len(part))
        return [int(f.id.split(":")[1]) % 2 == 0 for f in part]

    evens = [f for f in facts if int(f.id.split(":")[1]) % 2 == 0]
    got = first_passing(None, facts, 2, every_other, chunk=3)
    assert [f.id for f in got] == [f.id for f in evens[:2]]
    assert sum(calls) < len(facts)  # stopped once 2 passed
    assert [f.id for f in first_passing(None, facts, 100, every_other, chunk=4)] == [f.id for f in evens]
