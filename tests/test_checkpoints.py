"""Local checkpoints: ``load_model("/path/to/save_pretrained-dir")`` loads any architecture TransformerLens supports,
offline, unprocessed; its logits equal the Hugging Face model's. Directory names that TransformerLens would sniff
("llama", "gemma") must not change what is loaded."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from locedit.tracer import UnknownModelError, load_model, trace
from locedit.tracer.profiles import profile_for

IDS = torch.tensor([[5, 100, 2000, 7, 9, 31000, 42]])


def _gpt2(vocab):
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=128,
                                      n_ctx=128))  # real GPT-2 config.json files carry n_ctx; TL reads it


def _llama(vocab):
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=128))


@pytest.mark.parametrize("build,dirname", [(_gpt2, "my-gpt2-run"), (_llama, "tiny-llama-ckpt")])
def test_checkpoint_logits_equal_hf(build, dirname, tokenizer, tmp_path):
    torch.manual_seed(0)
    hf = build(len(tokenizer)).eval()
    path = tmp_path / dirname
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = load_model(str(path), device="cpu")
    assert model.cfg.model_name == dirname and not model.cfg.default_prepend_bos
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 64
    with torch.no_grad():
        diff = (model(IDS) - hf(IDS).logits).abs().max().item()
    assert diff < 1e-4, diff
    assert profile_for(model).family == "unknown"  # the fallback profile: GPT-J's hparams, edit layer scaled
    res = trace(model, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " French", samples=2)
    assert res.grid.shape == (10, 2) and res.subject_span == (4, 9)


def test_a_directory_that_is_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UnknownModelError, match="config.json"):
        load_model(str(tmp_path))
