"""Editors: ROME / MEMIT / constrained FT on the embedded model (SmolLM2-135M, 30 layers).

Edit layer 12 (middle of the 30 layers; ROME's rewrite works there on the chosen facts). The key statistics are
computed once (cached) for layers 10..14 (MEMIT's window around 12, which includes ROME's layer).
"""

import gzip
import hashlib
import json
from pathlib import Path
from dataclasses import replace

import pytest
import torch

from locedit.editors import (
    EditRequest,
    EditResult,
    EmptyTargetError,
    LayerOutOfRangeError,
    SubjectNotFoundError,
    apply,
    apply_deltas,
    default_hparams,
    edit,
    restore,
    window_layers,
)
from locedit.tracer import GaussianNoise, resolve_sigma, target_probs

LAYER = 12
# CounterFact case_ids whose true target is the embedded model's greedy next token (checked in test_facts_known)
CASE_IDS = (0, 104, 396, 461, 576)


def _hash(model) -> str:
    h = hashlib.sha256()
    for n, p in sorted(model.state_dict().items()):
        h.update(n.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def facts():
    # the vendored CounterFact subset (ROME schema), as shipped in the repo
    path = Path(__file__).resolve().parent.parent / "problems" / "data" / "counterfact.json.gz"
    with gzip.open(path, "rt") as f:
        records = {r["case_id"]: r for r in json.load(f) if r["case_id"] in CASE_IDS}
    return [records[c] for c in CASE_IDS]


def _req(rec, which="target_new"):
    rr = rec["requested_rewrite"]
    return EditRequest(rr["prompt"], rr["subject"], " " + rr[which]["str"])


def test_facts_known(model, facts):
    for rec in facts:
        req = _req(rec, "target_true")
        with torch.no_grad():
            logits = model(req.text)[0, -1]
        first = model.tokenizer(req.target, add_special_tokens=False)["input_ids"][0]
        assert int(logits.argmax()) == first, req


def test_rome_rewrites_and_neighborhood(model, facts):
    h0 = _hash(model)
    ok = 0
    for rec in facts:
        req = _req(rec)
        nb = rec["neighborhood_prompts"][0]
        true = " " + rec["requested_rewrite"]["target_true"]["str"]
        p_nb0 = float(target_probs(model, [nb], [true])[0])
        with edit(model, req, "rome", [LAYER]) as res:
            p_new = float(target_probs(model, [req.text], [req.target])[0])
            p_nb1 = float(target_probs(model, [nb], [true])[0])
            assert set(res.deltas) == {f"blocks.{LAYER}.mlp.W_out"}
            assert torch.linalg.matrix_rank(res.deltas[f"blocks.{LAYER}.mlp.W_out"].float()) == 1
        ok += p_new > 0.5
        assert abs(p_nb1 - p_nb0) < 0.1, (req, p_nb0, p_nb1)
    assert ok >= 4
    assert _hash(model) == h0


def test_ft_linf_exact(model, facts):
    req = _req(facts[0])
    hp = replace(default_hparams("ft", "smollm2"), num_steps=5, norm_constraint=1e-4)
    W0 = model.blocks[LAYER].mlp.W_out.detach().clone()
    b0 = model.blocks[LAYER].mlp.b_out.detach().clone()
    with edit(model, req, "ft", [LAYER], hparams=hp) as res:
        W, b = model.blocks[LAYER].mlp.W_out.detach(), model.blocks[LAYER].mlp.b_out.detach()
        assert (W - W0).abs().max().item() <= 1e-4
        assert (b - b0).abs().max().item() <= 1e-4
        assert (W - W0).abs().max().item() > 5e-5  # the bound is active
        assert len(res.losses) == 5
    assert torch.equal(model.blocks[LAYER].mlp.W_out, W0)


def test_memit_edits_five_layers_only(model, facts):
    req = _req(facts[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    p0 = float(target_probs(model, [req.text], [req.target])[0])
    window = tuple(window_layers(LAYER, 5, model.cfg.n_layers))
    assert window == (10, 11, 12, 13, 14)
    with edit(model, req, "memit", window) as res:
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {f"blocks.{layer}.mlp.W_out" for layer in window}
        assert float(target_probs(model, [req.text], [req.target])[0]) > p0 + 0.2
        assert res.layers == window
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_minimize_lowers_true_target(model, facts):
    req = _req(facts[2], "target_true")
    p0 = float(target_probs(model, [req.text], [req.target])[0])
    hp = replace(default_hparams("rome", "smollm2"), v_num_grad_steps=8)
    with edit(model, req, "rome", [LAYER], hparams=hp, objective="minimize"):
        p1 = float(target_probs(model, [req.text], [req.target])[0])
    assert p1 < p0 / 2, (p0, p1)


def test_restores_when_body_raises(model, facts):
    h0 = _hash(model)
    hp = replace(default_hparams("ft", "smollm2"), num_steps=2)
    with pytest.raises(RuntimeError, match="boom"):
        with edit(model, _req(facts[0]), "ft", [LAYER, LAYER + 1], hparams=hp):
            assert _hash(model) != h0
            raise RuntimeError("boom")
    assert _hash(model) == h0


def test_errors(model):
    good = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    with pytest.raises(LayerOutOfRangeError, match="30"):
        apply(model, good, "rome", [30])
    with pytest.raises(LayerOutOfRangeError, match="-1"):
        apply(model, good, "ft", [-1])
    with pytest.raises(EmptyTargetError):
        apply(model, replace(good, target=""), "rome", [LAYER])
    with pytest.raises(SubjectNotFoundError):
        apply(model, replace(good, template="The mother tongue of X is"), "rome", [LAYER])
    with pytest.raises(ValueError, match="unknown edit method"):
        apply(model, good, "mend", [LAYER])
    with pytest.raises(ValueError, match="exactly one layer"):
        apply(model, good, "rome", [3, 4])


def test_save_load_apply_restore_roundtrip(model, facts, tmp_path):
    h0 = _hash(model)
    hp = replace(default_hparams("ft", "smollm2"), num_steps=3)
    res = apply(model, _req(facts[1]), "ft", [LAYER], hparams=hp)
    h1 = _hash(model)
    assert h1 != h0
    res.save(tmp_path / "edit.pt")
    restore(model, res)
    assert _hash(model) == h0
    loaded = EditResult.load(tmp_path / "edit.pt")
    assert loaded.method == "ft" and loaded.layers == (LAYER,) and loaded.losses == res.losses
    apply_deltas(model, loaded.deltas)
    assert _hash(model) == h1
    restore(model, loaded)
    assert _hash(model) == h0


def test_rome_fast_matches_plain(model, facts):
    """The fast path (resid cached, blocks from the edit layer on) gives the plain path's v* delta. Tolerance:
    the two differ only by float32 summation order ((a+b)+δ vs a+(b+δ), fewer blocks), amplified by a few Adam
    steps; we require a relative difference < 1e-3."""
    req = _req(facts[1])
    hp = replace(default_hparams("rome", "smollm2"), v_num_grad_steps=4)
    noise = GaussianNoise(sigma=resolve_sigma(model), samples=2, seed=0)
    fast = apply(model, req, "rome", [LAYER], hparams=hp, noise=noise, fast=True)
    restore(model, fast)
    plain = apply(model, req, "rome", [LAYER], hparams=hp, noise=noise, fast=False)
    restore(model, plain)
    a, b = fast.info["v_star"], plain.info["v_star"]
    assert ((a - b).norm() / b.norm()).item() < 1e-3
    name = f"blocks.{LAYER}.mlp.W_out"
    rel = (fast.deltas[name] - plain.deltas[name]).norm() / plain.deltas[name].norm()
    assert rel.item() < 1e-3
    assert fast.info["noise_samples"] == 2


@pytest.mark.parametrize("method,layers", [("rome", [LAYER]), ("memit", [10, 11, 12, 13, 14])])
@pytest.mark.parametrize("backend", ["lean", "transformerlens"])
def test_fast_path_equals_plain_on_both_suffix_backends(model, facts, monkeypatch, method, layers, backend):
    """The editors' fast path runs through the shared suffix runner; on either backend (lean blocks, or
    TransformerLens blocks for models the lean path does not support) its update equals the plain path's."""
    from locedit.tracer import suffix as suffix_mod

    if backend == "transformerlens":
        monkeypatch.setattr(suffix_mod, "lean_supported", lambda m: False)
    req = _req(facts[2])
    hp = replace(default_hparams(method, "smollm2"), v_num_grad_steps=3)
    fast = apply(model, req, method, layers, hparams=hp, fast=True)
    restore(model, fast)
    plain = apply(model, req, method, layers, hparams=hp, fast=False)
    restore(model, plain)
    for name in fast.deltas:
        rel = (fast.deltas[name] - plain.deltas[name]).norm() / plain.deltas[name].norm()
        assert rel.item() < 1e-3, (name, rel.item())


def test_restore_refuses_out_of_order_and_twice(model, facts):
    """Undoing an edit that is not the most recent one of its parameters (or undoing it twice) used to corrupt the
    weights silently (max error 0.47); it now raises and changes nothing."""
    from locedit.editors import EditOrderError

    h0 = _hash(model)
    hp = replace(default_hparams("ft", "smollm2"), num_steps=2)
    first = apply(model, _req(facts[0]), "ft", [LAYER], hparams=hp)
    second = apply(model, _req(facts[1]), "ft", [LAYER], hparams=hp)
    h2 = _hash(model)
    with pytest.raises(EditOrderError, match="most recent"):
        restore(model, first)
    assert _hash(model) == h2  # refused without touching anything
    restore(model, second)
    restore(model, first)
    assert _hash(model) == h0
    with pytest.raises(EditOrderError):
        restore(model, first)  # twice
    assert _hash(model) == h0
    assert all(p.grad is None for p in model.parameters())  # FT leaves no gradients behind


def test_non_integer_layers_are_refused(model, facts):
    with pytest.raises(LayerOutOfRangeError, match="integers"):
        apply(model, _req(facts[0]), "rome", [5.7])
