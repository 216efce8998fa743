"""Gaussian subject noise (Meng et al. 2022; Hase et al. 2023 §3.2): s_noise = embed(s) + ε, ε ~ N(0, σ²).

The noise is added at ``hook_embed`` to the subject's token positions only. One draw per (seed, samples,
n_subject_tokens) is reused for every restored cell, and (by the editors, for Fact Forcing) at the subject
positions of *each* prompt, wherever the subject sits in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

__all__ = ["SubjectNoise", "embedding_std", "resolve_sigma", "noise_hook"]

ROME_NOISE_MULTIPLIER = 3.0


def embedding_std(model: HookedTransformer) -> float:
    """Standard deviation of all entries of the token embedding matrix ``W_E``."""
    return float(model.W_E.detach().float().std())


def resolve_sigma(model: HookedTransformer, noise: float | None = None, sigma: float | None = None) -> float:
    """Absolute noise σ: ``sigma`` if given, else ``noise`` × std(W_E) (ROME's "s3" rule with noise=3)."""
    if sigma is not None:
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        return float(sigma)
    mult = ROME_NOISE_MULTIPLIER if noise is None else float(noise)
    if mult <= 0:
        raise ValueError(f"noise multiplier must be > 0, got {mult}")
    return mult * embedding_std(model)


@dataclass(frozen=True)
class SubjectNoise:
    """A reproducible Gaussian noise draw for a subject.

    Attributes:
        sigma: absolute standard deviation of ε.
        samples: number of noise samples (rows) per prompt.
        seed: seed of the draw; the same (seed, samples, n_tokens) always gives the same ε.
        values: optional explicit ``[samples, n_subject_tokens, d_model]`` tensor used instead of a draw
            (its first dimension must equal ``samples``; its second the subject length it is used with).
        of: draw ``of`` samples and keep the first ``samples`` of them (the same values as in the ``of``-sample
            draw, e.g. a subset of the tracer's noise); default ``samples``.
    """

    sigma: float
    samples: int = 10
    seed: int = 0
    values: Tensor | None = None
    of: int | None = None

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.values is not None and self.values.shape[0] != self.samples:
            raise ValueError(f"noise tensor has {self.values.shape[0]} samples, expected {self.samples}")
        if self.of is not None and self.of < self.samples:
            raise ValueError(f"of ({self.of}) must be >= samples ({self.samples})")

    def draw(
        self, n_tokens: int, d_model: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Float[Tensor, "samples n_tokens d_model"]:
        """ε for a subject of ``n_tokens`` tokens."""
        if self.values is not None:
            if tuple(self.values.shape[1:]) != (n_tokens, d_model):
                raise ValueError(
                    f"explicit noise has shape {tuple(self.values.shape)}, "
                    f"expected [{self.samples}, {n_tokens}, {d_model}]"
                )
            return self.values.to(device=device, dtype=dtype)
        gen = torch.Generator().manual_seed(self.seed)
        eps = torch.randn(self.of or self.samples, n_tokens, d_model, generator=gen, dtype=torch.float32)
        eps = eps[: self.samples]
        return (eps * self.sigma).to(device=device, dtype=dtype)


def noise_hook(spans: Sequence[tuple[int, int]], noise: Sequence[Float[Tensor, "n d_model"]]):
    """A ``hook_embed`` hook adding ``noise[b]`` to positions ``spans[b]`` of batch row ``b``."""

    def hook(embed: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Float[Tensor, "batch pos d_model"]:
        embed = embed.clone()
        for b, ((s, e), eps) in enumerate(zip(spans, noise)):
            embed[b, s:e] = embed[b, s:e] + eps.to(embed.dtype)
        return embed

    return hook
