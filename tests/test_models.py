"""Model loading: the hand-built SmolLM2 config reproduces the Hugging Face model, and bad names fail clearly."""

import pytest
import torch

from locedit.tracer import EMBEDDED_MODEL, UnknownModelError, locate_subject, target_probs
from locedit.tracer.models import load_hf_reference


def test_logits_match_hf_model(model):
    hf_model, tokenizer = load_hf_reference()
    prompts = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of", "Toko Yasuda plays the"]
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        assert torch.equal(ids[0], model.to_tokens(prompt)[0]), "TL and HF tokenization differ"
        with torch.no_grad():
            ours = model(ids)
            ref = hf_model(ids).logits
        assert (ours - ref).abs().max().item() < 1e-3


def test_no_bos_and_knows_a_fact(model):
    tokens = model.to_tokens("The mother tongue of Danielle Darrieux is")
    assert tokens[0, 0].item() != model.tokenizer.bos_token_id
    assert model.cfg.n_layers == 30 and model.cfg.d_mlp == 1536 and model.cfg.n_key_value_heads == 3
    logits = model(tokens)[0, -1]
    assert model.to_string(logits.argmax()) == " French"


def test_subject_location_by_character_offsets(model):
    pt = locate_subject(model, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux")
    assert pt.subject_span == (4, 9)
    assert "".join(pt.str_tokens[4:9]).strip() == "Danielle Darrieux"
    assert locate_subject(model, "Danielle Darrieux speaks", "Danielle Darrieux").subject_span[0] == 0


def test_batched_target_probs_equal_single(model):
    prompts = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of"]
    targets = [" French", " the French Republic"]
    batched = target_probs(model, prompts, targets)
    single = torch.cat([target_probs(model, [p], [t]) for p, t in zip(prompts, targets)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-4)
    # teacher forcing by hand for the multi-token target
    toks = model.to_tokens(prompts[1] + targets[1])
    n = model.to_tokens(prompts[1]).shape[1]
    logp = model(toks)[0].log_softmax(-1)
    manual = sum(logp[i - 1, toks[0, i]] for i in range(n, toks.shape[1])).exp()
    assert abs(manual.item() - single[1].item()) < 1e-5


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(UnknownModelError, match="Unknown model"):
        from locedit.tracer import load_model

        load_model("definitely-not-a-model-xyz")
    assert EMBEDDED_MODEL == "smollm2-135m"


def test_copy_free_modules_match_stock_and_switch_back(model):
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    from locedit.tracer.fast_modules import CopyFreeGatedMLP, CopyFreeUnembed, stock_modules

    tokens = model.to_tokens("The mother tongue of Danielle Darrieux is")
    assert type(model.blocks[0].mlp) is CopyFreeGatedMLP and type(model.unembed) is CopyFreeUnembed
    with torch.no_grad():
        fast = model(tokens)
        with stock_modules(model):
            assert type(model.blocks[7].mlp) is GatedMLP and type(model.unembed) is not CopyFreeUnembed
            stock = model(tokens)
    assert type(model.blocks[7].mlp) is CopyFreeGatedMLP and type(model.unembed) is CopyFreeUnembed
    # equal up to float32 summation order: measured 8.8e-5 (1 thread) / 1.7e-4 (2 threads) on logits up to 28
    assert (fast - stock).abs().max().item() < 1e-5 * stock.abs().max().item()
