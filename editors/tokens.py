"""Edit token rules, declared once: the prompt position where ROME/MEMIT read the key k* and optimise v*.

A rule is an :data:`EDIT_TOKENS` name or an int offset from the last subject token. :func:`check_edit_token` is the
one validation of a rule (config, CLI, ``edit``/``apply``, ``run_edit``); :func:`token_position` resolves it in one
tokenized prompt; which methods have a key position at all is the method registry's ``uses_token``
(:meth:`editors.methods.EditMethod.edit_token`: a canonical rule, or None for constrained finetuning).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from locedit.tracer.tokens import PromptTokens
from locedit.tracer.vocab import check_choice

__all__ = [
    "DEFAULT_EDIT_TOKEN",
    "EDIT_TOKENS",
    "EditTokenRule",
    "EditTokenSpec",
    "TokenPositionError",
    "check_edit_token",
    "token_label",
    "token_position",
]

EditTokenRule = Literal["subject_first", "subject_last", "after_subject", "prompt_last"]


class TokenPositionError(ValueError):
    """An edit token rule names a position outside the prompt (before 0 or past its last token)."""


@dataclass(frozen=True)
class EditTokenSpec:
    """Where ROME/MEMIT read the key k* and optimise v*: one token of each prompt, named by a rule.

    Attributes:
        name: the rule's name; ``label`` its display label.
        reference: the reference code's ``fact_token`` name (rome/repr_tools ``get_words_idxs_in_templates``).
        position: ``(subject_start, subject_end, n_prompt_tokens) -> index`` (end exclusive); may be out of range,
            which :func:`token_position` turns into a typed error.
    """

    name: str
    label: str
    reference: str
    position: Callable[[int, int, int], int]


EDIT_TOKENS: Mapping[str, EditTokenSpec] = {
    "subject_first": EditTokenSpec("subject_first", "first subject token", "subject_first", lambda s, e, n: s),
    "subject_last": EditTokenSpec("subject_last", "last subject token", "subject_last", lambda s, e, n: e - 1),
    "after_subject": EditTokenSpec("after_subject", "first token after the subject", "subject_first_after_last",
                                   lambda s, e, n: e),
    "prompt_last": EditTokenSpec("prompt_last", "last prompt token", "last", lambda s, e, n: n - 1),
}
assert tuple(EDIT_TOKENS) == get_args(EditTokenRule)
DEFAULT_EDIT_TOKEN = "subject_last"
"""ROME's and MEMIT's own position (and every earlier locedit edit's)."""


def check_edit_token(token: object) -> str | int:
    """A token rule: an :data:`EDIT_TOKENS` name, or an int offset from the last subject token (``-1``: the token
    before it; ``1``: = ``"after_subject"``). Strings of an int (``"-1"``, from a config or CLI) become the int."""
    if isinstance(token, bool):
        raise ValueError(f"unknown edit token rule {token!r}; choose one of {tuple(EDIT_TOKENS)} or an int offset")
    if isinstance(token, int):
        return token
    if isinstance(token, str) and token.lstrip("+-").isdigit():
        return int(token)
    return check_choice(token, EDIT_TOKENS, "edit token rule (or an int offset from the last subject token)")


def token_label(token: str | int) -> str:
    """Display label of a token rule (``"last subject token"``, ``"last subject token −1"``)."""
    if isinstance(token, int) or (isinstance(token, str) and token.lstrip("+-").isdigit()):
        k = int(token)
        return "last subject token" if k == 0 else f"last subject token {'+' if k > 0 else '−'}{abs(k)}"
    return EDIT_TOKENS[token].label



def token_position(pt: PromptTokens, token: str | int = "subject_last", prompt: str | None = None) -> int:
    """The index in ``pt`` of the position an edit token rule names (:data:`editors.tokens.EDIT_TOKENS`, or an int
    offset from the last subject token). Indices count a BOS the profile prepends.

    Raises:
        TokenPositionError: the position is outside ``[0, n_tokens)``; the message names the prompt and position.
        ValueError: unknown rule.
    """
    rule = check_edit_token(token)
    s, e = pt.subject_span
    pos = e - 1 + rule if isinstance(rule, int) else EDIT_TOKENS[rule].position(s, e, pt.n_tokens)
    if not 0 <= pos < pt.n_tokens:
        text = prompt if prompt is not None else "".join(pt.str_tokens)
        raise TokenPositionError(
            f"edit token {token!r} names position {pos} of prompt {text!r}, which has {pt.n_tokens} tokens "
            f"(subject at {s}..{e - 1})"
        )
    return pos
