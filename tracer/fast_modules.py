"""Copy-free gated MLP and unembedding for TransformerLens models.

TransformerLens 3.9's :class:`GatedMLP.forward` calls ``F.linear(x, W.T.contiguous())`` for ``W_gate``, ``W_in`` and
``W_out``: three full weight copies (~10 MB for SmolLM2) on *every* call. For the many small passes of causal
tracing and of ROME's v* optimization those copies dominated the run time (6.3 s of a 24 s ROME edit).
:class:`CopyFreeGatedMLP` computes the same function, ``(act(x W_gate) * (x W_in) + b_in) W_out + b_out``, with
matmuls on the stored ``[d_model, d_mlp]`` / ``[d_mlp, d_model]`` layout, through the same hook points, and reads
the parameters at call time (so in-place edits of ``W_out`` take effect). Results differ from the stock module only
by float summation order. :class:`CopyFreeUnembed` does the same for ``Unembed`` (whose ``W_U.T.contiguous()`` copies
the 113 MB unembedding of SmolLM2 on every call).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.components.unembed import Unembed

__all__ = ["CopyFreeGatedMLP", "CopyFreeUnembed", "use_copy_free_modules", "stock_modules"]


class CopyFreeGatedMLP(GatedMLP):
    """:class:`GatedMLP` without per-call weight copies (same parameters, hooks and maths)."""

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        if self.W_gate.device != x.device:
            x = x.to(self.W_gate.device)
        pre_act = self.hook_pre(x @ self.W_gate)
        if self.cfg.is_layer_norm_activation() and self.hook_mid is not None and self.ln is not None:
            post_act = self.hook_post(self.ln(self.hook_mid(self.act_fn(pre_act))))
        else:
            pre_linear = self.hook_pre_linear(x @ self.W_in)
            post_act = self.hook_post(self.act_fn(pre_act) * pre_linear + self.b_in)
        return post_act @ self.W_out + self.b_out


class CopyFreeUnembed(Unembed):
    """:class:`Unembed` without the per-call copy of ``W_U``: ``residual @ W_U + b_U``."""

    def forward(self, residual: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_vocab"]:
        return self.hook_out(self.hook_in(residual) @ self.W_U + self.b_U)


def use_copy_free_modules(model: HookedTransformer) -> int:
    """Switch the stock ``GatedMLP`` and ``Unembed`` modules of ``model`` to the copy-free classes in place (same
    parameters and hooks); returns how many modules were switched."""
    n = 0
    for block in model.blocks:
        if type(block.mlp) is GatedMLP:
            block.mlp.__class__ = CopyFreeGatedMLP
            n += 1
    if type(model.unembed) is Unembed:
        model.unembed.__class__ = CopyFreeUnembed
        n += 1
    return n


@contextmanager
def stock_modules(model: HookedTransformer):
    """Inside the context, ``model`` runs TransformerLens's stock ``GatedMLP`` / ``Unembed`` (with their per-call
    weight copies) instead of the copy-free classes; on exit the copy-free classes are back. For benchmarks that
    compare against what a hand-written hook loop on a stock HookedTransformer gets. Parameters are untouched."""
    swapped = [m for m in [*(b.mlp for b in model.blocks), model.unembed] if type(m) in (CopyFreeGatedMLP, CopyFreeUnembed)]
    old = [type(m) for m in swapped]
    try:
        for m, cls in zip(swapped, old):
            m.__class__ = GatedMLP if cls is CopyFreeGatedMLP else Unembed
        yield model
    finally:
        for m, cls in zip(swapped, old):
            m.__class__ = cls
