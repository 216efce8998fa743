"""locedit.editors: ROME, MEMIT and constrained finetuning on TransformerLens models, with exact undo.

    from locedit.editors import EditRequest, edit, apply
    request = EditRequest(template="The mother tongue of {} is", subject="Danielle Darrieux", target=" English")
    with edit(model, request, method="rome", layers=[6]) as result:
        ...
"""

from locedit.editors.context import UnsupportedDtypeError, apply, edit, edited_parameter_names, with_hparams
from locedit.editors.covariance import key_second_moment, key_second_moments
from locedit.editors.deltas import Convergence, EditOrderError, EditResult, apply_deltas, restore
from locedit.editors.hparams import FTHyperParams, MEMITHyperParams, ROMEHyperParams
from locedit.editors.methods import EDIT_METHODS, EditMethod, EditMethodName, default_hparams, method_layers, resolve_method
from locedit.editors.tokens import (
    DEFAULT_EDIT_TOKEN,
    EDIT_TOKENS,
    TokenPositionError,
    check_edit_token,
    token_label,
    token_position,
)
from locedit.editors.requests import (
    EditRequest,
    EmptyTargetError,
    LayerOutOfRangeError,
    SubjectNotFoundError,
    UnsupportedArchitectureError,
)
from locedit.tracer.vocab import window_layers
from locedit.editors.templates import context_templates

__all__ = [
    "DEFAULT_EDIT_TOKEN",
    "EDIT_METHODS",
    "EDIT_TOKENS",
    "TokenPositionError",
    "check_edit_token",
    "token_label",
    "token_position",
    "EditMethod",
    "EditMethodName",
    "EditOrderError",
    "EditRequest",
    "EditResult",
    "EmptyTargetError",
    "FTHyperParams",
    "LayerOutOfRangeError",
    "UnsupportedArchitectureError",
    "UnsupportedDtypeError",
    "MEMITHyperParams",
    "ROMEHyperParams",
    "SubjectNotFoundError",
    "apply",
    "apply_deltas",
    "context_templates",
    "default_hparams",
    "edit",
    "edited_parameter_names",
    "key_second_moment",
    "key_second_moments",
    "method_layers",
    "resolve_method",
    "restore",
    "window_layers",
    "with_hparams",
]
