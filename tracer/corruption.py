"""Corruptions of the subject, declared once: Gaussian noise (Meng et al. 2022; Hase et al. 2023 §3.2), a subject
flip (Reber's proposal) and zeroing (Hase et al. App. B). ``trace``, ``zero``, ``apply``/``edit``, ``run_edit`` and
the study config all take these objects (or a bare float, which :func:`as_corruption` reads as a
:class:`GaussianNoise` *scale* everywhere).

Gaussian noise: s_noise = embed(s) + ε, ε ~ N(0, σ²), added at ``hook_embed`` to the subject's token positions
only. σ is ``sigma`` when given (absolute), else ``scale`` × a noise-scale rule's std (:data:`NOISE_SCALE_RULES`).
The one default everywhere a bare scale is given (``trace``, ``locedit trace``, ``run_edit``, o_noise, Fact Forcing,
a study) is :data:`DEFAULT_NOISE_SCALE_RULE`, ROME's "s3": the scale multiplies the std of the embedding outputs of
known_1000's subject tokens (σ = 3 × 0.117 = 0.350 on SmolLM2-135M-Instruct). "embedding" (the std of all of W_E,
σ = 0.407 there) is what runs made before the s3 rule used; they name it explicitly. One draw per
(seed, samples, n_subject_tokens) is reused for every restored cell and, for Fact Forcing, at the subject positions
of *each* prompt, wherever the subject sits in it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

__all__ = [
    "DEFAULT_NOISE_SCALE_RULE",
    "NOISE_SCALE_RULES",
    "NoiseScaleRule",
    "s3_subjects",
    "subject_embedding_std",
    "Corruption",
    "GaussianNoise",
    "SubjectFlip",
    "Zeroing",
    "as_corruption",
    "as_gaussian_noise",
    "embedding_std",
    "noise_hook",
    "noise_std",
    "resolve_sigma",
]

ROME_NOISE_SCALE = 3.0


def _positive_finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be finite and > 0, got {value!r}")
    return float(value)


def embedding_std(model: HookedTransformer) -> float:
    """Standard deviation of all entries of the token embedding matrix ``W_E``."""
    return float(model.W_E.detach().float().std())


def subject_embedding_std(model: HookedTransformer, subjects: Sequence[str]) -> float:
    """ROME's ``collect_embedding_std``: the standard deviation of all entries of the embedding-layer outputs
    (``hook_embed``) of the subjects' tokens, each subject tokenized alone (no BOS)."""
    ids = [i for s in subjects for i in model.tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError("no subject tokens to measure the embedding std on")
    with torch.no_grad():
        out = model.embed(torch.tensor([ids], device=model.cfg.device))
    return float(out.float().std())


S3_SUBJECTS_FILE = Path(__file__).parent / "data" / "s3_subjects.json"


def s3_subjects() -> list[str]:
    """The distinct subjects of ROME's known_1000, sorted: the reference set of the s3 rule (``data/SOURCES.md``)."""
    return json.loads(S3_SUBJECTS_FILE.read_text(encoding="utf-8"))


def _known_subjects_std(model: HookedTransformer) -> float:
    return subject_embedding_std(model, s3_subjects())


NOISE_SCALE_RULES: Mapping[str, tuple[str, Callable[[HookedTransformer], float]]] = MappingProxyType({
    "embedding": ("std of all entries of W_E (runs made before the s3 rule name it explicitly)", embedding_std),
    "s3": ("ROME's s3: std of the embedding outputs of known_1000's subject tokens (× 3 reproduces ROME's and the "
           "paper's grids)", _known_subjects_std),
})
"""Noise-scale rules by name: what a noise *scale* multiplies to give σ (description, ``model -> std``)."""

NoiseScaleRule = Literal["s3", "embedding"]
DEFAULT_NOISE_SCALE_RULE: NoiseScaleRule = "s3"
"""The rule a bare noise scale multiplies wherever none is named (ROME's)."""


def noise_std(model: HookedTransformer, rule: str = DEFAULT_NOISE_SCALE_RULE) -> float:
    """The std a noise *scale* multiplies, by ``rule`` (:data:`NOISE_SCALE_RULES`; default ROME's "s3")."""
    if rule not in NOISE_SCALE_RULES:
        raise ValueError(f"unknown noise scale rule {rule!r}; choose one of {tuple(NOISE_SCALE_RULES)}")
    return NOISE_SCALE_RULES[rule][1](model)


def resolve_sigma(
    model: HookedTransformer, scale: float | None = None, sigma: float | None = None,
    rule: str = DEFAULT_NOISE_SCALE_RULE,
) -> float:
    """Absolute noise σ: ``sigma`` if given, else ``scale`` × :func:`noise_std` (default scale 3 × ROME's s3 std)."""
    if sigma is not None:
        return _positive_finite(sigma, "sigma")
    return _positive_finite(ROME_NOISE_SCALE if scale is None else scale, "noise scale") * noise_std(model, rule)


@dataclass(frozen=True)
class GaussianNoise:
    """A reproducible Gaussian noise draw for a subject.

    Attributes:
        scale: σ as a multiple of the ``rule``'s std (default 3 × ROME's s3 std); ignored when ``sigma`` is given.
        sigma: absolute standard deviation of ε (e.g. 0.094, the paper's GPT-J value).
        samples: number of noise samples (rows) per prompt.
        seed: seed of the draw; the same (seed, samples, n_tokens) always gives the same ε.
        values: optional explicit ``[samples, n_subject_tokens, d_model]`` tensor used instead of a draw.
        of: draw ``of`` samples and keep the first ``samples`` (a prefix of a larger draw, see :meth:`prefix`).
        rule: the noise-scale rule a ``scale`` multiplies (:data:`NOISE_SCALE_RULES`: "s3", the default, or
            "embedding").

    :meth:`resolve` fixes σ for a model; :meth:`draw` needs a resolved object (``sigma`` or ``values`` set).
    """

    scale: float | None = ROME_NOISE_SCALE
    sigma: float | None = None
    samples: int = 10
    seed: int = 0
    values: Tensor | None = None
    of: int | None = None
    rule: NoiseScaleRule = DEFAULT_NOISE_SCALE_RULE
    kind: ClassVar[str] = "noise"

    def __post_init__(self) -> None:
        if self.scale is not None:
            _positive_finite(self.scale, "noise scale")
        if self.sigma is not None:
            _positive_finite(self.sigma, "sigma")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {self.samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.values is not None:
            if self.values.ndim != 3 or self.values.shape[0] != self.samples:
                raise ValueError(
                    f"noise tensor has shape {tuple(self.values.shape)}, expected [{self.samples}, n_subject, d_model]"
                )
            if not bool(torch.isfinite(self.values).all()):
                raise ValueError("the noise tensor has NaN or infinite entries")
        if self.rule not in NOISE_SCALE_RULES:
            raise ValueError(f"unknown noise scale rule {self.rule!r}; choose one of {tuple(NOISE_SCALE_RULES)}")
        if self.of is not None and self.of < self.samples:
            raise ValueError(f"of ({self.of}) must be >= samples ({self.samples})")

    @classmethod
    def from_values(cls, values: Tensor, seed: int = 0) -> GaussianNoise:
        """Explicit noise ``[samples, n_subject, d_model]``; σ is recorded as the tensor's empirical std."""
        values = values.detach()
        return cls(scale=None, sigma=float(values.float().std()), samples=int(values.shape[0]), seed=seed,
                   values=values)

    @property
    def resolved(self) -> bool:
        return self.sigma is not None or self.values is not None

    def resolve(self, model: HookedTransformer) -> GaussianNoise:
        """This noise with σ fixed for ``model`` (``sigma``, else ``scale`` × the rule's std)."""
        if self.resolved:
            return self
        return replace(self, sigma=resolve_sigma(model, self.scale, rule=self.rule))

    def prefix(self, samples: int | None) -> GaussianNoise:
        """The first ``samples`` samples of this draw (the same values: one seeded stream); all when None."""
        if samples is None or samples >= self.samples:
            return self
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {samples!r}")
        if self.values is not None:
            return replace(self, samples=samples, values=self.values[:samples])
        return replace(self, samples=samples, of=self.of or self.samples)

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
        if self.sigma is None:
            raise ValueError("this GaussianNoise has only a scale: call .resolve(model) to fix sigma first")
        gen = torch.Generator().manual_seed(self.seed)
        eps = torch.randn(self.of or self.samples, n_tokens, d_model, generator=gen, dtype=torch.float32)
        eps = eps[: self.samples]
        return (eps * self.sigma).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class SubjectFlip:
    """Replace the subject by ``subject`` (the corrupted run is the flipped prompt; Reber's proposal)."""

    subject: str
    kind: ClassVar[str] = "flip"

    def __post_init__(self) -> None:
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError("a subject flip needs a non-empty replacement subject")


@dataclass(frozen=True)
class Zeroing:
    """No corrupted run: zero the traced outputs on the clean run (Hase et al. App. B); ``per_token`` zeroes one
    token at a time instead of the whole subject."""

    per_token: bool = False
    kind: ClassVar[str] = "zero"


Corruption = GaussianNoise | SubjectFlip | Zeroing


def as_corruption(
    noise: float | int | Corruption | Tensor | None = None,
    *,
    sigma: float | None = None,
    samples: int = 10,
    seed: int = 0,
) -> Corruption:
    """The one reading of a corruption argument: a corruption object as is; a bare number → ``GaussianNoise(scale=
    number, sigma, samples, seed)`` (a multiplier of the s3 rule's std, everywhere); an explicit noise tensor →
    :meth:`GaussianNoise.from_values`; None → the default scale 3."""
    if isinstance(noise, (GaussianNoise, SubjectFlip, Zeroing)):
        return noise
    if isinstance(noise, Tensor):
        return GaussianNoise.from_values(noise, seed=seed) if sigma is None else replace(
            GaussianNoise.from_values(noise, seed=seed), sigma=_positive_finite(sigma, "sigma"))
    if noise is None:
        noise = ROME_NOISE_SCALE
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise TypeError(f"noise must be a number, a GaussianNoise, a SubjectFlip or a Zeroing, got {noise!r}")
    return GaussianNoise(scale=float(noise), sigma=sigma, samples=samples, seed=seed)


def as_gaussian_noise(noise, model: HookedTransformer, *, what: str = "this", **defaults) -> GaussianNoise:
    """:func:`as_corruption` for callers that take Gaussian subject noise only (editing, o_noise, Fact Forcing),
    resolved for ``model``; ``TypeError`` naming ``what`` for a flip or a zeroing."""
    noise = as_corruption(noise, **defaults)
    if not isinstance(noise, GaussianNoise):
        raise TypeError(f"{what} takes Gaussian subject noise, got {type(noise).__name__}")
    return noise.resolve(model)


def noise_hook(spans: Sequence[tuple[int, int]], noise: Sequence[Float[Tensor, "n d_model"]]):
    """A ``hook_embed`` hook adding ``noise[b]`` to positions ``spans[b]`` of batch row ``b``."""

    def hook(embed: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Float[Tensor, "batch pos d_model"]:
        embed = embed.clone()
        for b, ((s, e), eps) in enumerate(zip(spans, noise)):
            embed[b, s:e] = embed[b, s:e] + eps.to(embed.dtype)
        return embed

    return hook
