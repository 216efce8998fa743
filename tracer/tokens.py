"""Tokenization helpers shared by the tracer, the editors and the problems.

All tokenization goes through the model's tokenizer with ``add_special_tokens=False``. Prompts get a BOS token
only when the model's profile says so (:attr:`tracer.profiles.ModelProfile.prepend_bos`; never for the paper's
GPT-2/GPT-J nor the embedded SmolLM2, as in the reference code); targets never do. A subject is located by *character offsets* in the prompt, so that e.g. " Danielle"
and "Danielle" at the start of a prompt both map to the right tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

__all__ = [
    "EmptyTargetError",
    "PromptTooLongError",
    "UnspacedTargetWarning",
    "warn_unspaced_target",
    "SubjectNotFoundError",
    "PromptTokens",
    "check_length",
    "check_template",
    "encode",
    "locate_subject",
    "target_tokens",
]


class UnspacedTargetWarning(UserWarning):
    """A user's target has no leading space (``"French"`` where ``" French"`` is meant)."""


def warn_unspaced_target(target: str, stacklevel: int = 3) -> None:
    """Warn when a target given by a user lacks its leading space: after a prompt that ends in a word, the model's
    next token is the spaced word's, so p(target) comes out tiny (p ≈ 2e-5 for "French" on the embedded model).
    Called where users give targets (``trace``, ``apply``/``edit``), not where a model's own decoded prediction is
    the target (Tracing Reversal's o_noise)."""
    if isinstance(target, str) and target and not target[0].isspace():
        warnings.warn(f"target {target!r} has no leading space: after a prompt that ends in a word the model's next "
                      f"token is {' ' + target!r}'s first token, so p({target!r}) is tiny; give {' ' + target!r}",
                      UnspacedTargetWarning, stacklevel=stacklevel)


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the model's context (``n_ctx``)."""


def check_template(template: str, what: str = "template") -> str:
    """``template`` if it has exactly one ``{}`` for the subject and no other brace (which ``str.format`` would
    misread); else a ``ValueError`` that says so (raised where the template is given, not at edit time)."""
    if not isinstance(template, str) or template.count("{}") != 1:
        n = template.count("{}") if isinstance(template, str) else 0
        raise (SubjectNotFoundError if n == 0 else ValueError)(f"{what} {template!r} must have exactly one '{{}}' for the subject, it has {n}")
    if "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
        raise ValueError(f"{what} {template!r} has a brace besides its '{{}}': write a literal brace as '{{{{' or "
                         "'}}}}'... or avoid it (str.format fills the subject in)")
    return template


def check_length(model: HookedTransformer, n_tokens: int, text: str) -> None:
    """:class:`PromptTooLongError` when ``n_tokens`` exceed the model's context."""
    if n_tokens > model.cfg.n_ctx:
        raise PromptTooLongError(f"prompt {text[:60]!r}... has {n_tokens} tokens, more than the model's context of "
                                 f"{model.cfg.n_ctx}")


class SubjectNotFoundError(ValueError):
    """The subject string does not occur in the prompt."""


class EmptyTargetError(ValueError):
    """The target string is empty or tokenizes to no token."""


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt with its subject located.

    Attributes:
        tokens: ``[T]`` token ids (BOS first only if the model's profile prepends it).
        str_tokens: the ``T`` token strings.
        subject_span: ``(start, end)`` token indices, end exclusive, of the subject.
    """

    tokens: Int[Tensor, "T"]
    str_tokens: tuple[str, ...]
    subject_span: tuple[int, int]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def last_subject_index(self) -> int:
        return self.subject_span[1] - 1


def bos_ids(model: HookedTransformer) -> list[int]:
    """``[bos_token_id]`` when the model's profile prepends BOS to prompts, else ``[]``."""
    from locedit.tracer.profiles import profile_for

    if not profile_for(model).prepend_bos:
        return []
    if model.tokenizer.bos_token_id is None:
        raise ValueError(f"the profile of {model.cfg.model_name} prepends BOS but its tokenizer has none")
    return [int(model.tokenizer.bos_token_id)]


def encode(model: HookedTransformer, text: str) -> Int[Tensor, "T"]:
    """Token ids of a prompt ``text``: no special tokens, BOS first only if the model's profile says so."""
    ids = bos_ids(model) + list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    check_length(model, len(ids), text)
    return torch.tensor(ids, dtype=torch.long)


def locate_subject(model: HookedTransformer, prompt: str, subject: str) -> PromptTokens:
    """Tokenize ``prompt`` and find the tokens covering the first occurrence of ``subject``.

    A token belongs to the subject when its character span overlaps the subject's characters (a leading space
    merged into the subject's first token counts as part of it).

    Raises:
        SubjectNotFoundError: ``subject`` is empty or not a substring of ``prompt``.
    """
    if not subject or not subject.strip():
        raise SubjectNotFoundError(f"empty subject for prompt {prompt!r}")
    start_char = prompt.find(subject)
    if start_char < 0:
        raise SubjectNotFoundError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    end_char = start_char + len(subject)
    enc = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    covered = [i for i, (a, b) in enumerate(offsets) if a < end_char and b > start_char]
    if not covered:
        raise SubjectNotFoundError(f"subject {subject!r} maps to no token of prompt {prompt!r}")
    bos = bos_ids(model)
    ids = bos + list(ids)
    check_length(model, len(ids), prompt)
    str_tokens = tuple(model.tokenizer.decode([i]) for i in ids)
    return PromptTokens(torch.tensor(ids, dtype=torch.long), str_tokens, (covered[0] + len(bos), covered[-1] + 1 + len(bos)))


def target_tokens(model: HookedTransformer, target: str) -> Int[Tensor, "n_target"]:
    """Token ids of a target continuation (give it its leading space, e.g. ``" French"``).

    Raises:
        EmptyTargetError: the target is empty or tokenizes to nothing.
    """
    if not isinstance(target, str) or not target.strip():
        raise EmptyTargetError(f"target must be a non-empty string, got {target!r}")

    ids = torch.tensor(model.tokenizer(target, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() == 0:
        raise EmptyTargetError(f"target {target!r} tokenizes to no token")
    return ids
