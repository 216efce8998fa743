"""locedit.tracer: load models as HookedTransformers and localize facts (causal tracing, zeroing, flipping)."""

from tracer.models import (
    EMBEDDED_MODEL,
    ModelUnavailableError,
    UnknownModelError,
    cache_dir,
    load_model,
)
from tracer.noise import SubjectNoise, embedding_std, resolve_sigma
from tracer.probs import target_log_probs, target_probs
from tracer.result import TraceResult
from tracer.tokens import EmptyTargetError, PromptTokens, SubjectNotFoundError, locate_subject, target_tokens
from tracer.tracing import (
    FlipAlignmentError,
    UnknownKindError,
    UnknownMethodError,
    flop_fraction,
    trace,
    window_layers,
    zero,
)

__all__ = [
    "EMBEDDED_MODEL",
    "EmptyTargetError",
    "FlipAlignmentError",
    "TraceResult",
    "UnknownKindError",
    "UnknownMethodError",
    "flop_fraction",
    "trace",
    "window_layers",
    "zero",
    "ModelUnavailableError",
    "PromptTokens",
    "SubjectNoise",
    "SubjectNotFoundError",
    "UnknownModelError",
    "cache_dir",
    "embedding_std",
    "load_model",
    "locate_subject",
    "resolve_sigma",
    "target_log_probs",
    "target_probs",
    "target_tokens",
]
