"""A lean, hook-free forward of TransformerLens blocks over a *suffix* of positions, for the exact tracer and the
editors' fast paths.

Both causal tracing and ROME/MEMIT's v* optimisation change the residual stream at one position ``p`` of a prompt
and then need the model above some layer. Causal attention means positions ``< p`` are unchanged, so each block only
has to run on positions ``p..N-1``, attending to the unchanged keys/values of the prefix. TransformerLens can do
this (a frozen ``TransformerLensKeyValueCacheEntry``), but its attention re-projects keys and queries with one
einsum per matrix, re-applies rotary to the whole cache at every call, repeats grouped KV heads and runs every hook
point; on a 135M-parameter model those overheads cost as much as the matmuls. :class:`LeanBlocks` packs
``W_Q | W_K | W_V`` of each block into one ``[d_model, (n_heads + 2·n_kv_heads)·d_head]`` matrix (one GEMM), keeps
prefix keys *after* rotary (applied once per prompt, not per call), and uses
:func:`torch.nn.functional.scaled_dot_product_attention` with grouped KV heads. Norms and MLPs are the model's
own modules (so the copy-free MLP and in-place ``W_out`` edits apply). Results equal ``model.blocks[j]`` up to float
summation order (~1e-6 relative).

Supported: causal attention with standard or rotary positions (GPT-2, GPT-J, Llama/SmolLM2 families), MHA or GQA,
sequential or parallel attention/MLP, and Gemma 3's block: per-head QK-norm (before rotary, as TransformerLens),
pre- and post-norms around attention and MLP (``hook_attn_out`` / ``hook_mlp_out`` after the post-norm), sliding-
window local layers (each layer's own rotary base through its own tables) and its attention scale.
:func:`lean_supported` says whether a model qualifies; callers fall back to TransformerLens blocks otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES

__all__ = ["LeanBlocks", "lean_supported", "mlp_out", "mlp_post_norm", "post_norm_blocks"]


def post_norm_blocks(cfg) -> bool:
    """True when the blocks normalize each sublayer's output before adding it to the residual stream (Gemma 2/3's
    ``ln1_post`` / ``ln2_post``: TransformerLens's ``use_normalization_before_and_after``). The one place that says
    so: the lean blocks, the MLP-output map and MEMIT's refusal read it."""
    return bool(getattr(cfg, "use_normalization_before_and_after", False))


def mlp_post_norm(model: HookedTransformer, layer: int):
    """The map from the MLP's own output (``k @ W_out + b_out``, the vector ROME edits) to what the block adds to
    the residual stream: ``ln2_post`` in post-norm blocks (Gemma 2/3: ``use_normalization_before_and_after``), else
    None (the identity; ``hook_mlp_out`` then *is* the MLP's output)."""
    if post_norm_blocks(model.cfg):
        return model.blocks[layer].ln2_post
    return None


def mlp_out(model: HookedTransformer, layer: int, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """What ``blocks.{layer}.hook_mlp_out`` holds when ``resid`` enters the block's MLP (resid_mid; resid_pre in
    parallel blocks): ``mlp(ln2(resid))``, passed through :func:`mlp_post_norm` where the block has one."""
    blk = model.blocks[layer]
    out = blk.mlp(blk.ln2(resid))
    post = mlp_post_norm(model, layer)
    return out if post is None else post(out)


def lean_supported(model: HookedTransformer) -> bool:
    """True when the model's profile allows the lean path and every block is a plain causal pre-norm block that
    :class:`LeanBlocks` reproduces exactly."""
    from locedit.tracer.profiles import profile_for

    if not profile_for(model).lean_fast_path:
        return False
    cfg = model.cfg
    unsupported = (
        cfg.positional_embedding_type not in ("standard", "rotary")
        or cfg.attention_dir != "causal"
        or getattr(cfg, "use_logn_attn", False)
        or getattr(cfg, "use_dynamic_ntk_rope", False)
        or getattr(cfg, "clip_qkv", None) is not None
        or (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0
        or getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
        or getattr(cfg, "original_architecture", None) in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
        or getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES
        or cfg.attn_only
    )
    return not unsupported


@dataclass(frozen=True)
class _PackedAttention:
    w_qkv: Tensor  # [d_model, (H + 2 Hkv) d_head]
    b_qkv: Tensor  # [(H + 2 Hkv) d_head]
    w_o: Tensor  # [H d_head, d_model]
    b_o: Tensor  # [d_model]


class LeanBlocks:
    """Packed attention weights of ``model``'s blocks ``layers`` (a snapshot of ``W_Q/W_K/W_V/W_O``; build it
    after any edit of those; ``W_out``/``b_out`` and the norms are read live from the model).

    Args:
        model: the HookedTransformer (must satisfy :func:`lean_supported`).
        layers: the blocks to pack (default all).
    """

    def __init__(self, model: HookedTransformer, layers=None):
        if not lean_supported(model):
            raise ValueError("LeanBlocks does not support this model's configuration; use model.blocks")
        cfg = model.cfg
        self.model = model
        self.n_heads = cfg.n_heads
        self.n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.d_head = cfg.d_head
        self.rotary = cfg.positional_embedding_type == "rotary"
        self.parallel = bool(cfg.parallel_attn_mlp)
        self.qk_norm = bool(getattr(cfg, "use_qk_norm", False))
        self.post_norms = post_norm_blocks(cfg)
        self.packed: dict[int, _PackedAttention] = {}
        self.scale: dict[int, float] = {}  # 1 / the layer's attention scale (TransformerLens divides by it)
        self.window: dict[int, int | None] = {}  # a local layer's window: keys within window_size - 1 positions back
        for j in range(cfg.n_layers) if layers is None else layers:
            attn = model.blocks[j].attn
            self.packed[j] = self._pack(attn)
            self.scale[j] = 1.0 / float(attn.attn_scale)
            self.window[j] = int(cfg.window_size) if getattr(attn, "attn_type", "global") == "local" else None

    @torch.no_grad()
    def _pack(self, attn) -> _PackedAttention:
        d = self.model.cfg.d_model
        wk = getattr(attn, "_W_K", attn.W_K)
        wv = getattr(attn, "_W_V", attn.W_V)
        bk = getattr(attn, "_b_K", attn.b_K)
        bv = getattr(attn, "_b_V", attn.b_V)
        mats = [attn.W_Q, wk, wv]  # [heads, d_model, d_head] each
        w = torch.cat([m.permute(1, 0, 2).reshape(d, -1) for m in mats], dim=1).contiguous()
        b = torch.cat([attn.b_Q.reshape(-1), bk.reshape(-1), bv.reshape(-1)])
        w_o = attn.W_O.reshape(-1, d).contiguous()
        return _PackedAttention(w, b, w_o, attn.b_O.detach())

    # ------------------------------------------------------------------------------------------------ pieces
    def _rotate(self, layer: int, x: Tensor, positions: Tensor) -> Tensor:
        """Rotary at per-row absolute ``positions`` ``[rows, pos]`` (TransformerLens's tables and rotation)."""
        attn = self.model.blocks[layer].attn
        if int(positions.max()) >= attn.rotary_cos.shape[0]:
            attn.apply_rotary(x[:1, :1], int(positions.max()))  # lets TransformerLens extend its tables
        rd = self.model.cfg.rotary_dim
        cos = attn.rotary_cos[positions][:, :, None, :]
        sin = attn.rotary_sin[positions][:, :, None, :]
        x_rot = x[..., :rd]
        rotated = x_rot * cos + attn.rotate_every_two(x_rot) * sin
        return rotated if rd == x.shape[-1] else torch.cat([rotated, x[..., rd:]], dim=-1)

    def keys_values(
        self, layer: int, normed: Float[Tensor, "rows pos d_model"], offset: int = 0, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q ``[rows, H, pos, d_head]``, k/v ``[rows, Hkv, pos, d_head]`` (q and k rotated at ``offset``, or at
        per-row absolute ``positions`` ``[rows, pos]``)."""
        pk = self.packed[layer]
        H, Hkv, dh = self.n_heads, self.n_kv, self.d_head
        rows, pos, _ = normed.shape
        qkv = torch.addmm(pk.b_qkv, normed.reshape(rows * pos, -1), pk.w_qkv).view(rows, pos, H + 2 * Hkv, dh)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
        if self.qk_norm:  # per-head RMSNorm over d_head, before rotary
            attn = self.model.blocks[layer].attn
            q, k = attn.q_norm(q), attn.k_norm(k)
        if self.rotary and positions is not None:
            q, k = self._rotate(layer, q, positions), self._rotate(layer, k, positions)
        elif self.rotary:
            attn = self.model.blocks[layer].attn
            q = attn.apply_rotary(q, offset)
            k = attn.apply_rotary(k, offset)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @torch.no_grad()
    def prefix_keys_values(
        self, layer: int, keys: Float[Tensor, "rows pos n_kv d_head"], values: Float[Tensor, "rows pos n_kv d_head"]
    ) -> tuple[Tensor, Tensor]:
        """TransformerLens's cached ``attn.hook_k`` / ``hook_v`` (keys before rotary) → the ``[rows, Hkv, pos,
        d_head]`` keys (QK-normed where the model has it, rotated at their absolute positions) and values this class
        attends to."""
        if self.qk_norm:
            keys = self.model.blocks[layer].attn.k_norm(keys)
        if self.rotary:
            keys = self.model.blocks[layer].attn.apply_rotary(keys, 0)
        return keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()

    def block(
        self,
        layer: int,
        x: Float[Tensor, "rows pos d_model"],
        past_k: Tensor | None = None,
        past_v: Tensor | None = None,
        *,
        query_positions: Tensor | None = None,
        attn_override=None,
        mlp_override=None,
        starts: Tensor | None = None,
    ) -> Float[Tensor, "rows out_pos d_model"]:
        """``model.blocks[layer]`` on positions ``offset..offset+pos-1`` of each row (``offset`` = prefix length),
        attending to the prefix ``past_k``/``past_v`` ``[rows, Hkv, offset, d_head]`` (rotated, see
        :meth:`prefix_keys_values`) and causally to ``x`` itself.

        ``query_positions`` (local indices): compute the block's output only there (keys/values still come from all
        positions) — for the last block, where only the scored positions matter. ``attn_override`` /
        ``mlp_override``: callables ``f(out [rows, pos', d_model]) -> out`` applied to the attention / MLP output
        (the tracer's restoration; positions are local to the returned positions).

        ``starts`` ``[rows]`` (ragged rows): row r's local position 0 is its absolute position ``starts[r]``; it
        attends only to the first ``starts[r]`` prefix entries (``past_k`` holds at least ``max(starts)``, rows
        padded with anything). Rows then need no common offset, so each computes only its own suffix.
        """
        blk = self.model.blocks[layer]
        offset = 0 if past_k is None else int(past_k.shape[2])
        normed = blk.ln1(x)
        pos = x.shape[1]
        local = torch.arange(pos, device=x.device)
        positions = None if starts is None else starts[:, None] + local[None, :]
        q, k, v = self.keys_values(layer, normed, offset, positions)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        if query_positions is not None:
            q = q[:, :, query_positions]
            qidx = query_positions.to(x.device)
            x = x[:, query_positions]
        else:
            qidx = local
        # causal: local query i sees the (row's) prefix and local keys ≤ i
        key_idx = torch.arange(offset + pos, device=x.device)
        mask = key_idx[None, :] <= (qidx[:, None] + offset)  # [q, keys]
        window = self.window[layer]
        if window is not None:  # a local layer: absolute key position > absolute query position − window
            if starts is None:
                mask = mask & (key_idx[None, :] > qidx[:, None] + offset - window)
            else:  # row r: prefix key j is at j, local key j at starts[r] + j − offset; query i at starts[r] + i
                abs_key = torch.where(key_idx[None, :] < offset, key_idx[None, :],
                                      starts[:, None] + key_idx[None, :] - offset)  # [rows, keys]
                abs_q = starts[:, None] + qidx[None, :]  # [rows, q]
                mask = mask[None] & (abs_key[:, None, :] > abs_q[:, :, None] - window)  # [rows, q, keys]
        if starts is not None:
            in_prefix = key_idx[None, :] < starts[:, None]  # [rows, keys]
            valid = torch.cat([in_prefix[:, :offset], torch.ones(len(starts), pos, dtype=torch.bool, device=x.device)], 1)
            mask = (mask if mask.dim() == 3 else mask[None]) & valid[:, None, :]
            mask = mask[:, None]  # [rows, 1, q, keys]
        z = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale[layer], enable_gqa=self.n_kv != self.n_heads
        )  # [rows, H, q, d_head]
        rows, nq = z.shape[0], z.shape[2]
        pk = self.packed[layer]
        attn_out = torch.addmm(pk.b_o, z.transpose(1, 2).reshape(rows * nq, -1), pk.w_o).view(rows, nq, -1)
        if self.post_norms:  # before hook_attn_out, as TransformerLens
            attn_out = blk.ln1_post(attn_out)
        if attn_override is not None:
            attn_out = attn_override(attn_out)
        if self.parallel:
            m = mlp_out(self.model, layer, x)
            if mlp_override is not None:
                m = mlp_override(m)
            return x + attn_out + m
        mid = x + attn_out
        m = mlp_out(self.model, layer, mid)
        if mlp_override is not None:
            m = mlp_override(m)
        return mid + m
