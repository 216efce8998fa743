"""The one suffix runner: blocks of a HookedTransformer over a *suffix* of positions, attending to cached prefix
keys/values — shared by exact causal tracing (:mod:`tracer.tracing`) and the editors' fast path
(:mod:`editors.inputs`).

Both change the residual stream at one position ``p`` of a prompt and then need the blocks above: causal attention
leaves positions ``< p`` unchanged, so each block runs on positions ``p..`` only, attending to the unchanged keys and
values of the prefix. :class:`SuffixRunner` has two backends behind one :meth:`SuffixRunner.block`:

* **lean** (:class:`tracer.lean.LeanBlocks`: packed QKV, prefix keys rotated once, SDPA, ragged rows) where
  :func:`tracer.lean.lean_supported` allows it;
* **TransformerLens** blocks with a frozen ``TransformerLensKeyValueCacheEntry`` otherwise (rows with different
  prefix lengths run as one call per distinct length; a restoration is a temporary hook on the block's output hook).

Both give ``model.blocks[j]``'s numbers up to float summation order; the tracer's exact == naive and the editors'
fast == plain tests run through whichever backend the model gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from locedit.tracer.lean import LeanBlocks, lean_supported
from locedit.tracer.vocab import TRACING_KINDS

__all__ = ["Restore", "SuffixRunner"]



@dataclass(frozen=True)
class Restore:
    """Inside one block, set an output at one or more suffix positions of some rows (causal tracing's restoration;
    representation zeroing writes zeros).

    Attributes:
        kind: "mlp" / "attn" (the block's MLP / attention output, before it is added to the residual stream) or
            "resid" (the block's output).
        rows: ``[n]`` which rows of the block's input are restored.
        position: the suffix-local position restored, or a tuple of them (before any ``query_positions``
            selection).
        value: ``[d_model]`` the value written there (at every position of a tuple).
    """

    kind: Literal["mlp", "attn", "resid"]
    rows: Bool[Tensor, " n"]
    position: int | tuple[int, ...]
    value: Float[Tensor, " d_model"]

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.position,) if isinstance(self.position, int) else tuple(self.position)


def _write(out: Tensor, rows: Tensor, positions: Sequence[int], value: Tensor) -> Tensor:
    """``out[r, p] = value`` for every restored row r and position p."""
    r = torch.nonzero(rows)[:, 0]
    p = torch.as_tensor(list(positions), device=out.device)
    out[r[:, None], p[None, :]] = value
    return out


def _as_cached(model: HookedTransformer, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """``hook_k``/``hook_v`` → what TransformerLens's KV cache stores for that block: its attention transforms keys
    between ``hook_k`` and the cache append — QK-norm (Gemma 3, Qwen 3: ``_apply_qk_norm``; OLMo 2/3 and OLMoE: the
    norm over the concatenated heads) and ``clip_qkv`` clamping — so a frozen cache entry built from the hooks must
    apply the same transforms (without them, exact tracing on a QK-norm model was off by ~10 %)."""
    cfg = model.cfg
    attn = model.blocks[layer].attn
    with torch.no_grad():
        if cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
            shape = keys.shape
            keys = attn.k_norm(keys.reshape(*shape[:2], -1)).reshape(shape)
        elif getattr(cfg, "use_qk_norm", False):
            keys = attn._apply_qk_norm(keys, attn.k_norm)
        if cfg.clip_qkv is not None:
            keys = keys.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv)
            values = values.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv)
    return keys, values


class SuffixRunner:
    """Run ``model``'s blocks over suffixes of positions (see module docstring).

    Args:
        model: the HookedTransformer.
        layers: the blocks that will be run (the lean backend packs only these; default all).
        lean: force (True/False) or auto-select (None: :func:`lean_supported`) the lean backend.
    """

    def __init__(self, model: HookedTransformer, layers=None, *, lean: bool | None = None):
        self.model = model
        use_lean = lean_supported(model) if lean is None else lean
        self.lean = LeanBlocks(model, layers) if use_lean else None

    @property
    def is_lean(self) -> bool:
        return self.lean is not None

    @torch.no_grad()
    def prefix(
        self, layer: int, keys: Float[Tensor, "rows pos n_kv d_head"], values: Float[Tensor, "rows pos n_kv d_head"]
    ) -> tuple[Tensor, Tensor]:
        """Cached ``blocks.{layer}.attn.hook_k`` / ``hook_v`` → this backend's prefix keys/values (rotated
        ``[rows, kv, pos, d_head]`` for lean; for TransformerLens what its KV cache holds, see :func:`_as_cached`)."""
        if self.lean is not None:
            return self.lean.prefix_keys_values(layer, keys, values)
        return _as_cached(self.model, layer, keys, values)

    def block(
        self,
        layer: int,
        x: Float[Tensor, "n P d_model"],
        prefix: tuple[Tensor, Tensor] | None,
        *,
        starts: int | Tensor = 0,
        rows: Tensor | None = None,
        query_positions: Tensor | None = None,
        restore: Restore | None = None,
    ) -> Float[Tensor, "n Q d_model"]:
        """``model.blocks[layer]`` on ``x``, whose row r holds absolute positions ``starts[r] .. starts[r]+P-1``.

        Row r attends causally to itself and to the first ``starts[r]`` entries of prefix row ``rows[r]``
        (``rows`` None: row r). ``starts``: one int for every row, or ``[n]`` per row (ragged). ``query_positions``
        (suffix-local): return only those positions (the last block, where only scored positions matter); keys and
        values still come from every position. ``restore``: see :class:`Restore`.
        """
        if self.lean is not None:
            return self._lean_block(layer, x, prefix, starts, rows, query_positions, restore)
        return self._tl_block(layer, x, prefix, starts, rows, query_positions, restore)

    # ------------------------------------------------------------------------------------------ backends
    def _lean_block(self, layer, x, prefix, starts, rows, query_positions, restore):
        ragged = isinstance(starts, Tensor)
        longest = int(starts.max()) if ragged else int(starts)
        past_k = past_v = None
        if prefix is not None and longest > 0:
            pk, pv = prefix
            if rows is not None:
                pk, pv = pk[rows], pv[rows]
            past_k, past_v = pk[:, :, :longest], pv[:, :, :longest]
        local: list[int] = []
        if restore is not None:
            local = list(restore.positions)
            if query_positions is not None:  # a restored position survives only if it is queried
                qp = query_positions.tolist()
                local = [qp.index(p) for p in local if p in qp]
        kwargs = {}
        if local and restore.kind in ("mlp", "attn"):

            def override(out, mask=restore.rows, local=local, value=restore.value):
                return _write(out, mask, local, value)

            kwargs[f"{restore.kind}_override"] = override
        out = self.lean.block(
            layer, x, past_k, past_v, query_positions=query_positions, starts=starts if ragged else None, **kwargs
        )
        if local and restore.kind == "resid":
            _write(out, restore.rows, local, restore.value)
        return out

    def _tl_block(self, layer, x, prefix, starts, rows, query_positions, restore):
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry as KVEntry

        if isinstance(starts, Tensor):
            groups = [(int(p), torch.nonzero(starts == p)[:, 0]) for p in torch.unique(starts).tolist()]
        else:
            groups = [(int(starts), None)]
        blk = self.model.blocks[layer]
        out = None
        for p, idx in groups:
            xg = x if idx is None else x[idx]
            entry = None
            if prefix is not None and p > 0:
                src = rows if idx is None else (idx if rows is None else rows[idx])
                pk, pv = prefix if src is None else (prefix[0][src], prefix[1][src])
                entry = KVEntry(past_keys=pk[:, :p], past_values=pv[:, :p], frozen=True)
            hooks = []
            if restore is not None:
                mask = restore.rows if idx is None else restore.rows[idx]
                if bool(mask.any()):

                    def write(act, hook, mask=mask, pos=restore.positions, value=restore.value):
                        return _write(act, mask, pos, value)

                    hooks.append((f"blocks.{layer}.{TRACING_KINDS[restore.kind].hook}", write))
            with self.model.hooks(fwd_hooks=hooks):
                y = blk(xg, past_kv_cache_entry=entry)
            if query_positions is not None:
                y = y[:, query_positions]
            if idx is None:
                return y
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[idx] = y
        return out
