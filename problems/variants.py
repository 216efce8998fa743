"""The problem registry: the five editing problems of Hase et al. 2023 (§5.1, Fig. 5). Their App. A hyper-parameter
overrides are model-profile data (:mod:`tracer.profiles`), applied by :func:`problem_hparams`.

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
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

import torch
from transformer_lens import HookedTransformer

from locedit.problems.facts import Fact
from locedit.tracer.corruption import GaussianNoise, as_gaussian_noise, noise_hook
from locedit.tracer.forward import scored_logits
from locedit.tracer.tokens import locate_subject
from locedit.tracer.vocab import check_choice

__all__ = [
    "DEFAULT_PROBLEM",
    "Problem",
    "PROBLEMS",
    "PROBLEM_NAMES",
    "ProblemName",
    "MissingTargetError",
    "default_noise",
    "noised_prediction",
    "problem_hparams",
    "resolve_problem",
]

ProblemName = Literal["error_injection", "tracing_reversal", "fact_erasure", "fact_amplification", "fact_forcing"]


class MissingTargetError(ValueError):
    """The fact lacks the object a problem needs (e.g. o_false for Error Injection on known_1000)."""


def default_noise(model: HookedTransformer, noise: GaussianNoise | float | None = None) -> GaussianNoise:
    """The resolved Gaussian noise for o_noise and Fact Forcing: ``noise`` itself, or a bare number read as everywhere
    (:func:`tracer.corruption.as_corruption`: a *scale*, a multiplier of the s3 rule's std), or None (scale 3); 10 samples,
    seed 0 unless the object says otherwise."""
    return as_gaussian_noise(noise, model, what="a problem's o_noise / Fact Forcing", samples=10, seed=0)


@torch.no_grad()
def noised_prediction(model: HookedTransformer, fact: Fact, noise: GaussianNoise | float | None = None) -> str:
    """o_noise: argmax of the noise-sample-averaged next-token distribution for (s_noise, r), decoded."""
    noise = default_noise(model, noise)
    pt = locate_subject(model, fact.prompt, fact.subject)
    s, e = pt.subject_span
    eps = noise.draw(e - s, model.cfg.d_model, model.cfg.device, model.cfg.dtype)
    toks = pt.tokens[None].repeat(noise.samples, 1).to(model.cfg.device)
    logits, _ = scored_logits(
        model, toks, torch.tensor([toks.shape[1] - 1]),
        fwd_hooks=[("hook_embed", noise_hook([(s, e)] * noise.samples, list(eps)))],
    )
    probs = logits[:, 0].double().softmax(-1).mean(0)
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
        label: display label ("Error Injection").
        objective: "maximize" or "minimize" p(target).
        target_kind: "o_false", "o_noise" or "o_true".
        noised_input: the edit and the rewrite/paraphrase scoring use the noised subject (Fact Forcing).
        erase: rewrite/paraphrase scored with the erasure form max(0, (p − p*)/p) (Fact Erasure).
        pair: (new, old) object kinds for Meng et al.'s success/magnitude metrics.
    """

    name: str
    label: str
    objective: str
    target_kind: str
    noised_input: bool = False
    erase: bool = False
    pair: tuple[str, str] = ("o_false", "o_true")

    @property
    def uses_noise(self) -> bool:
        """The problem needs the study's subject noise: a noised input (Fact Forcing) or o_noise as its target or
        in its scoring pair (Tracing Reversal)."""
        return self.noised_input or self.target_kind == "o_noise" or "o_noise" in self.pair

    def _obj(self, model, fact: Fact, kind: str, noise) -> str | None:
        if kind == "o_true":
            return fact.o_true
        if kind == "o_false":
            return fact.o_false
        return noised_prediction(model, fact, noise)

    def target(self, model: HookedTransformer, fact: Fact, noise: GaussianNoise | float | None = None) -> str:
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


PROBLEMS: Mapping[str, Problem] = MappingProxyType({
    "error_injection": Problem("error_injection", "Error Injection", "maximize", "o_false", pair=("o_false", "o_true")),
    "tracing_reversal": Problem("tracing_reversal", "Tracing Reversal", "maximize", "o_noise", pair=("o_noise", "o_true")),
    "fact_erasure": Problem("fact_erasure", "Fact Erasure", "minimize", "o_true", erase=True, pair=("o_false", "o_true")),
    "fact_amplification": Problem(
        "fact_amplification", "Fact Amplification", "maximize", "o_true", pair=("o_true", "o_false")
    ),
    "fact_forcing": Problem(
        "fact_forcing", "Fact Forcing", "maximize", "o_true", noised_input=True, pair=("o_true", "o_false")
    ),
})
PROBLEM_NAMES: tuple[str, ...] = tuple(PROBLEMS)
DEFAULT_PROBLEM: str = PROBLEM_NAMES[0]
"""The problem a study or table uses when none is named: Error Injection, the paper's headline."""
assert PROBLEM_NAMES == get_args(ProblemName)


def resolve_problem(problem: str) -> Problem:
    """The registry entry of ``problem``; ``ValueError`` naming the choices for an unknown one."""
    return PROBLEMS[check_choice(problem, PROBLEMS, "problem")]


def problem_hparams(problem: str, method: str, model="smollm2-135m", tuned: bool = True):
    """Hyper-parameters of edit ``method`` for ``problem`` on a model (a HookedTransformer or a name): the editors'
    defaults for the model (:func:`editors.default_hparams`) with the model profile's App. A overrides for
    (problem, method) applied, then the values ``locedit tune`` chose for this model (:mod:`tracer.profiles`; not
    with ``tuned=False``, the base a tuning run starts from)."""
    from locedit.editors.methods import default_hparams, resolve_method
    from locedit.tracer.profiles import profile_for

    entry = resolve_method(method, aliases=False)
    resolve_problem(problem)
    profile = profile_for(model)
    overrides = dict(profile.problem_hparams.get((problem, entry.name), {}))
    if tuned:
        overrides.update(profile.tuned.get((problem, entry.name), {}))
    return dataclasses.replace(default_hparams(entry.name, model), **overrides)
