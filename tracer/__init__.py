"""locedit.tracer: load models as HookedTransformers and localize facts (causal tracing, zeroing, flipping).

Vocabulary (:mod:`tracer.vocab`), corruptions (:mod:`tracer.corruption`), effect formulas (:mod:`tracer.effects`)
and model profiles (:mod:`tracer.profiles`) are declared here once and read by every other package.
"""

from locedit.tracer.corruption import (
    DEFAULT_NOISE_SCALE_RULE,
    Corruption,
    GaussianNoise,
    SubjectFlip,
    Zeroing,
    as_corruption,
    embedding_std,
    noise_std,
    resolve_sigma,
)
from locedit.tracer.effects import fractional_effect, peak_cell, per_layer_effect
from locedit.tracer.models import (
    EMBEDDED_MODEL,
    ModelUnavailableError,
    UnknownModelError,
    cache_dir,
    load_model,
)
from locedit.tracer.probs import target_log_probs, target_probs
from locedit.tracer.profiles import FALLBACK_PROFILE, PROFILES, ModelProfile, profile_for
from locedit.tracer.result import TRACING_COLUMNS, TraceResult, UndefinedEffectError, tracing_frame
from locedit.tracer.tokens import (
    EmptyTargetError,
    PromptTokens,
    SubjectNotFoundError,
    locate_subject,
    target_tokens,
)
from locedit.tracer.tracing import FlipAlignmentError, flop_fraction, trace, zero
from locedit.tracer.vocab import (
    CORRUPTIONS,
    TRACING_ALGORITHMS,
    TRACING_KINDS,
    CorruptionKind,
    TracingAlgorithm,
    TracingKind,
    UnknownAlgorithmError,
    UnknownKindError,
    window_layers,
)

__all__ = [
    "DEFAULT_NOISE_SCALE_RULE",
    "CORRUPTIONS",
    "Corruption",
    "CorruptionKind",
    "EMBEDDED_MODEL",
    "EmptyTargetError",
    "FALLBACK_PROFILE",
    "FlipAlignmentError",
    "GaussianNoise",
    "ModelProfile",
    "ModelUnavailableError",
    "PROFILES",
    "PromptTokens",
    "SubjectFlip",
    "SubjectNotFoundError",
    "TRACING_ALGORITHMS",
    "TRACING_COLUMNS",
    "TRACING_KINDS",
    "TraceResult",
    "TracingAlgorithm",
    "TracingKind",
    "UndefinedEffectError",
    "UnknownAlgorithmError",
    "UnknownKindError",
    "UnknownModelError",
    "Zeroing",
    "as_corruption",
    "cache_dir",
    "embedding_std",
    "flop_fraction",
    "fractional_effect",
    "load_model",
    "locate_subject",
    "noise_std",
    "peak_cell",
    "per_layer_effect",
    "profile_for",
    "resolve_sigma",
    "target_log_probs",
    "target_probs",
    "target_tokens",
    "trace",
    "tracing_frame",
    "window_layers",
    "zero",
]
