"""Essence texts and their perplexity (Hase et al. App. B, "Measuring essence drift").

Five texts are sampled from the *pre-edit* model given ``"{subject} is a"`` with top-k (k = 5) multinomial sampling,
20 new tokens each (seeded, EOS not a stop). The texts are stored as token ids and cached on disk per (model, subject,
settings) in ``tracer.models.cache_dir()/"essence"``. The perplexity of a text is exp(mean NLL of its generated tokens
given the prompt and the earlier generated tokens); the reported perplexity is the mean over the texts. The essence
score then compares the mean perplexity after the edit with the one before (:func:`problems.metrics.essence_score`).
"""

from __future__ import annotations

import hashlib

import torch
from transformer_lens import HookedTransformer

from locedit.problems.facts import essence_prompt
from locedit.tracer.models import cache_dir, model_id
from locedit.tracer.atomic import read_checked_json, write_checked_json
from locedit.tracer.forward import ResidCheckpoints, scored_logits
from locedit.tracer.tokens import encode

__all__ = ["EssenceTexts", "essence_texts", "essence_perplexity", "sample_tokens"]

N_TEXTS = 5
TOP_K = 5
NEW_TOKENS = 20


class EssenceTexts:
    """Token ids ``[n_texts, prompt_len + new_tokens]`` of the essence texts of a subject, with the prompt length."""

    def __init__(self, tokens: torch.Tensor, prompt_len: int):
        self.tokens = tokens
        self.prompt_len = prompt_len

    def decoded(self, model: HookedTransformer) -> list[str]:
        return [model.tokenizer.decode(t.tolist()) for t in self.tokens]


@torch.no_grad()
def sample_tokens(
    model: HookedTransformer, prompts: torch.Tensor, new_tokens: int, *, top_k: int = TOP_K, seed: int = 0
) -> torch.Tensor:
    """``[n, T + new_tokens]``: top-k multinomial continuations of ``[n, T]`` prompt ids (EOS not a stop, KV cache),
    seeded without touching the global RNG — the one sampler of the essence texts and the fluency generations."""
    devices = [model.cfg.device] if str(model.cfg.device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return model.generate(
            prompts.to(model.cfg.device),
            max_new_tokens=new_tokens,
            do_sample=True,
            top_k=top_k,
            stop_at_eos=False,
            use_past_kv_cache=True,
            verbose=False,
            return_type="tokens",
        ).cpu()


def _path(model: HookedTransformer, subject: str, n: int, k: int, new_tokens: int, seed: int):
    key = hashlib.sha256(f"{subject}\x00{n}\x00{k}\x00{new_tokens}\x00{seed}".encode()).hexdigest()[:20]
    return cache_dir() / "essence" / model_id(model) / f"{key}.json"


@torch.no_grad()
def essence_texts(
    model: HookedTransformer,
    subject: str,
    *,
    n: int = N_TEXTS,
    top_k: int = TOP_K,
    new_tokens: int = NEW_TOKENS,
    seed: int = 0,
    use_cache: bool = True,
) -> EssenceTexts:
    """Sample (or load from the cache) the essence texts of ``subject`` from the model *as it is now* — call this
    before editing."""
    path = _path(model, subject, n, top_k, new_tokens, seed)
    d = read_checked_json(path) if use_cache else None
    if d is not None:
        return EssenceTexts(torch.tensor(d["tokens"], dtype=torch.long), int(d["prompt_len"]))
    prompt = encode(model, essence_prompt(subject))
    gen = sample_tokens(model, prompt[None].repeat(n, 1), new_tokens, top_k=top_k, seed=seed)
    out = EssenceTexts(gen, int(prompt.numel()))
    if use_cache:
        write_checked_json(path, {"subject": subject, "prompt_len": out.prompt_len, "tokens": gen.tolist()})
    return out


@torch.no_grad()
def essence_perplexity(model: HookedTransformer, texts: EssenceTexts, *, checkpoints: ResidCheckpoints | None = None,
                       changed_from: int | None = None) -> float:
    """Mean over the texts of exp(mean NLL of the generated tokens). ``checkpoints``, ``changed_from``: record the
    unedited pass / rerun only the blocks an edit changed (:class:`tracer.forward.ResidCheckpoints`)."""
    toks = texts.tokens.to(model.cfg.device)
    start = texts.prompt_len
    positions = torch.arange(start - 1, toks.shape[1] - 1, device=toks.device)
    logits, _ = scored_logits(model, toks, positions, checkpoints=checkpoints, key="essence",
                              changed_from=changed_from)
    logp = logits.log_softmax(-1).double()
    nll = -logp.gather(-1, toks[:, start:, None]).squeeze(-1)
    return float(nll.mean(-1).exp().mean())
