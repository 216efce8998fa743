"""The five editing problems of Hase et al. 2023 (§5.1, Fig. 5) and their hyper-parameter overrides (App. A).

=====================  =========  ============================  =================================================
problem                objective  edit target                   input
=====================  =========  ============================  =================================================
error_injection        maximize   o_false                       (s, r)
tracing_reversal       maximize   o_noise                       (s, r)
fact_erasure           minimize   o_true                        (s, r)
fact_amplification     maximize   o_true                        (s, r)
fact_forcing           maximize   o_true                        (s_noise, r): noised in the edit and in scoring
=====================  =========  ============================  =================================================

o_noise (:func:`noised_prediction`) is the model's prediction for the noised input (s_noise, r) of Causal Tracing:
the next-token distributions of the noised runs (``noise.samples`` Gaussian draws at the subject's tokens, at
``hook_embed``) are averaged (mean of probabilities over samples), then the argmax token is taken — skipping tokens
that decode to whitespace only, which cannot be a target — and decoded as the target string (usually with its
leading space, e.g. " the"). The paper code sampled a whole generation instead (a quirk; see REFERENCE_NOTES).

Scoring pairs for Meng et al.'s unscaled metrics (``(new, old)``: success means p(new) > p(old) after the edit):
EI (o_false, o_true); TR (o_noise, o_true); FE (o_false, o_true) — erasing counts as a success when o_true falls
below o_false; FA and FF (o_true, o_false). Neighborhood success: p(o_true of the neighbour) > p(the pair's other
object) after the edit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from problems.facts import Fact
from tracer.noise import SubjectNoise, noise_hook, resolve_sigma
from tracer.tokens import locate_subject

__all__ = [
    "Problem",
    "PROBLEMS",
    "PROBLEM_NAMES",
    "STUDY_METHODS",
    "MissingTargetError",
    "default_noise",
    "noised_prediction",
    "problem_hparams",
    "hparam_overrides",
]

STUDY_METHODS = ("rome", "memit", "ft-1", "ft-5")


class MissingTargetError(ValueError):
    """The fact lacks the object a problem needs (e.g. o_false for Error Injection on known_1000)."""


def default_noise(model: HookedTransformer, noise: SubjectNoise | float | None = None) -> SubjectNoise:
    """A :class:`SubjectNoise`: ``noise`` itself, or σ = ``noise`` (an absolute float), or (None) ROME's rule
    σ = 3 × std(W_E) — always 10 samples, seed 0."""
    if isinstance(noise, SubjectNoise):
        return noise
    if noise is None:
        return SubjectNoise(resolve_sigma(model), samples=10, seed=0)
    return SubjectNoise(resolve_sigma(model, sigma=float(noise)), samples=10, seed=0)


@torch.no_grad()
def noised_prediction(model: HookedTransformer, fact: Fact, noise: SubjectNoise | float | None = None) -> str:
    """o_noise: argmax of the noise-sample-averaged next-token distribution for (s_noise, r), decoded."""
    noise = default_noise(model, noise)
    pt = locate_subject(model, fact.prompt, fact.subject)
    s, e = pt.subject_span
    eps = noise.draw(e - s, model.cfg.d_model, model.cfg.device, model.cfg.dtype)
    toks = pt.tokens[None].repeat(noise.samples, 1).to(model.cfg.device)
    logits = model.run_with_hooks(
        toks, fwd_hooks=[("hook_embed", noise_hook([(s, e)] * noise.samples, list(eps)))]
    )
    probs = logits[:, -1].double().softmax(-1).mean(0)
    for tok in probs.argsort(descending=True)[:50].tolist():
        text = model.tokenizer.decode([tok])
        if text.strip():
            return text
    raise ValueError(f"{fact.id}: no non-blank token among the 50 most likely noised predictions")


@dataclass(frozen=True)
class Problem:
    """One editing problem.

    Attributes:
        name: one of :data:`PROBLEM_NAMES`.
        objective: "maximize" or "minimize" p(target).
        target_kind: "o_false", "o_noise" or "o_true".
        noised_input: the edit and the rewrite/paraphrase scoring use the noised subject (Fact Forcing).
        erase: rewrite/paraphrase scored with the erasure form max(0, (p − p*)/p) (Fact Erasure).
        pair: (new, old) object kinds for Meng et al.'s success/magnitude metrics.
    """

    name: str
    objective: str
    target_kind: str
    noised_input: bool = False
    erase: bool = False
    pair: tuple[str, str] = ("o_false", "o_true")

    def _obj(self, model, fact: Fact, kind: str, noise) -> str | None:
        if kind == "o_true":
            return fact.o_true
        if kind == "o_false":
            return fact.o_false
        return noised_prediction(model, fact, noise)

    def target(self, model: HookedTransformer, fact: Fact, noise: SubjectNoise | float | None = None) -> str:
        """The edit target string for ``fact`` (o_noise needs the model and the noise)."""
        t = self._obj(model, fact, self.target_kind, noise)
        if t is None:
            raise MissingTargetError(f"{self.name} needs {self.target_kind}, which fact {fact.id} does not have")
        return t

    def scoring_pair(
        self, model: HookedTransformer, fact: Fact, target: str, noise=None
    ) -> tuple[str | None, str | None]:
        """(new, old) objects for the unscaled metrics; the edit target is reused, None where the fact lacks one."""
        return tuple(
            target if k == self.target_kind else self._obj(model, fact, k, noise) for k in self.pair
        )  # type: ignore[return-value]


PROBLEMS: dict[str, Problem] = {
    "error_injection": Problem("error_injection", "maximize", "o_false", pair=("o_false", "o_true")),
    "tracing_reversal": Problem("tracing_reversal", "maximize", "o_noise", pair=("o_noise", "o_true")),
    "fact_erasure": Problem("fact_erasure", "minimize", "o_true", erase=True, pair=("o_false", "o_true")),
    "fact_amplification": Problem("fact_amplification", "maximize", "o_true", pair=("o_true", "o_false")),
    "fact_forcing": Problem("fact_forcing", "maximize", "o_true", noised_input=True, pair=("o_true", "o_false")),
}
PROBLEM_NAMES = tuple(PROBLEMS)

# Hase et al. App. A. GPT-J values (used for every model but gpt2-xl and SmolLM2); keys: (problem, study method).
_OVERRIDES_GPTJ: dict[tuple[str, str], dict] = {
    ("error_injection", "ft-1"): {"norm_constraint": 1e-4},
    ("error_injection", "ft-5"): {"norm_constraint": 2e-5},
    ("error_injection", "rome"): {"kl_factor": 1.0},
    ("error_injection", "memit"): {"kl_factor": 0.9},
    ("tracing_reversal", "ft-1"): {"norm_constraint": 1e-5},
    ("tracing_reversal", "ft-5"): {"norm_constraint": 2e-5},
    ("fact_erasure", "ft-1"): {"norm_constraint": 1e-5},
    ("fact_erasure", "ft-5"): {"norm_constraint": 1e-5},
    ("fact_amplification", "ft-1"): {"norm_constraint": 1e-5},
    ("fact_amplification", "ft-5"): {"norm_constraint": 1e-5},
    ("fact_forcing", "ft-1"): {"norm_constraint": 1e-4, "num_steps": 50},
    ("fact_forcing", "ft-5"): {"norm_constraint": 1e-4, "num_steps": 50},
    ("fact_forcing", "rome"): {"v_num_grad_steps": 25, "v_lr": 0.05},
}
# gpt2-xl (App. A: only EI and FF were run); ROME/MEMIT: defaults.
_OVERRIDES_GPT2XL: dict[tuple[str, str], dict] = {
    ("error_injection", "ft-1"): {"norm_constraint": 1e-3},
    ("error_injection", "ft-5"): {"norm_constraint": 1e-4},
    ("fact_forcing", "ft-1"): {"norm_constraint": 5e-4, "num_steps": 50},
    ("fact_forcing", "ft-5"): {"norm_constraint": 5e-5, "num_steps": 50},
    ("fact_forcing", "rome"): {"v_num_grad_steps": 25, "v_lr": 0.05},
}


# SmolLM2-135M (the embedded model): the GPT-J table, except Error Injection's FT bounds, re-tuned by the paper's rule
# (`locedit tune-ft`: the largest bound with mean rewrite ≤ 0.99 at the paper's default layer scaled, 5 of 30; first
# known CounterFact facts). Measured: FT-1 (20 facts) 1e-4 → 0.002, 1e-3 → 0.056, 3e-3 → 0.544, 1e-2 → 0.905 (no
# bound reaches 0.99: 1e-2 is effectively unconstrained at lr 5e-4 × 25 steps); FT-5 (10 facts) 1e-4 → 0.023,
# 1e-3 → 0.966, 3e-3 → 0.991. The other problems keep GPT-J's bounds (not re-tuned; run `locedit tune-ft`).
_OVERRIDES_SMOLLM2: dict[tuple[str, str], dict] = {
    **_OVERRIDES_GPTJ,
    ("error_injection", "ft-1"): {"norm_constraint": 1e-2},
    ("error_injection", "ft-5"): {"norm_constraint": 1e-3},
}


def editor_method(method: str) -> str:
    """Study method ("rome", "memit", "ft-1", "ft-5") → editors method ("rome", "memit", "ft")."""
    m = str(method).lower()
    if m not in STUDY_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {STUDY_METHODS}")
    return "ft" if m.startswith("ft") else m


def hparam_overrides(problem: str, method: str, model_name: str = "smollm2-135m") -> dict:
    """The App. A overrides of ``problem`` × ``method`` (a dict of hparam field → value): gpt2-xl's table for gpt2-xl,
    the embedded model's (GPT-J's with Error Injection's FT bounds re-tuned) for SmolLM2, GPT-J's for any other model."""
    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; choose one of {PROBLEM_NAMES}")
    editor_method(method)
    name = model_name.lower()
    table = _OVERRIDES_GPT2XL if "gpt2-xl" in name else _OVERRIDES_SMOLLM2 if "smollm2" in name else _OVERRIDES_GPTJ
    return dict(table.get((problem, method.lower()), {}))


def problem_hparams(problem: str, method: str, model_name: str = "smollm2-135m"):
    """The editors' default hparams for the model with the problem's overrides applied (``dataclasses.replace``)."""
    from editors.hparams import FTHyperParams, MEMITHyperParams, ROMEHyperParams, default_hparams

    em = editor_method(method)
    try:
        base = default_hparams(em, model_name)
    except ValueError:  # unknown model family: the reference (GPT-J) values
        base = {"rome": ROMEHyperParams, "memit": MEMITHyperParams, "ft": FTHyperParams}[em]()
    return dataclasses.replace(base, **hparam_overrides(problem, method, model_name))
