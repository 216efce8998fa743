"""Causal tracing (Meng et al. 2022; Hase et al. 2023 §3.2), representation zeroing (Hase App. B) and input
flipping (Reber's proposal) on a HookedTransformer.

Causal tracing of a fact (s, r, o) with prompt P containing subject s:

* clean run: p_clean = p(o | P); the clean activations h_l(t) of the chosen kind are cached;
* corrupted run: the subject's token embeddings get Gaussian noise, s_noise = embed(s) + ε, ε ~ N(0, σ²)
  (``corrupt="noise"``, one draw of ``samples`` rows per fact reused for every cell), or the subject is replaced
  by another subject (``corrupt="flip"``); p_noised = mean over the noise samples of p(o | s_noise, r);
* restored run for cell (t, l): the corrupted run with the chosen outputs at token t and the window of layers
  ``range(max(0, l - w//2), min(L, l - (-w//2)))`` set to their clean values; grid[t, l] = mean over the noise
  samples of p(o | restored). Multi-token targets o = (o_1..o_m) are teacher-forced: p = exp(Σ_i log p(o_i | ·)),
  the sequence is prompt + o[:-1] and restoration only touches prompt token t.

Fractional effect (Hase §3.2 / §4.1): (grid[t, l] − p_noised) / |p_clean − p_noised|, clipped at 0
(:meth:`TraceResult.fractional`).

Three tracing algorithms (:data:`tracer.vocab.TRACING_ALGORITHMS`) compute the grid:

* ``"naive"``: one full forward pass (all noise samples batched) per (token, layer) cell with ``run_with_hooks``.
* ``"exact"`` (default): the same numbers, faster. Restoring token t at layers [a, b) cannot change (i) anything
  before layer a, so each cell starts from the corrupted run's cached ``blocks.{a}.hook_resid_pre``; (ii) any
  position < t (causal attention), so each cell only computes positions t..N-1, attending to the corrupted run's
  cached keys/values of positions < t; (iii) anything but position t inside layer a (the other positions' keys and
  values there come from the unchanged resid_pre(a)), so a cell joins at layer a + 1 from the cached resid_mid(a);
  (iv) logits and last-block outputs other than the m target positions, so only those are computed. Cells sharing a
  token are stacked on the batch dimension (rows join at their own layer) in chunks of ``batch_size`` rows. Blocks
  run through the shared :class:`tracer.suffix.SuffixRunner`: lean blocks (packed QKV, prefix keys rotated once,
  SDPA) where the model allows, else TransformerLens blocks with a frozen KV-cache entry, where a cell joins at its
  window's first layer instead of one later (iii) and restores inside that block. Cells of tokens before the subject
  are p_noised without a pass (in all algorithms, as in the reference code). :func:`flop_fraction` gives exact's
  FLOPs relative to naive.
* ``"attribution"``: first-order (attribution-patching) estimate from one corrupted forward + backward pass:
  Δp(t, l) ≈ Σ_{j ∈ window(l)} mean_s ∇_{h_j(t)} p_s · (h_j^clean(t) − h_j^s(t)), the gradient of the
  *probability* (not the log-prob) of the target for noise sample s; grid = p_noised + Δp (may leave [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor
from transformer_lens import HookedTransformer

from locedit.tracer.corruption import Corruption, GaussianNoise, SubjectFlip, Zeroing, as_corruption, noise_hook
from locedit.tracer.forward import logits_from_resid, scored_logits
from locedit.tracer.lean import lean_supported, mlp_out
from locedit.tracer.result import TraceResult
from locedit.tracer.suffix import Restore, SuffixRunner
from locedit.tracer.tokens import locate_subject, target_tokens, warn_unspaced_target
from locedit.tracer.vocab import (
    CORRUPTIONS,
    TRACING_ALGORITHMS,
    TRACING_KINDS,
    UnknownAlgorithmError,
    UnknownKindError,
    check_choice,
    window_layers,
)

__all__ = ["FlipAlignmentError", "check_flip", "trace", "zero", "flop_fraction"]

_DEFAULT_BATCH = 320


class FlipAlignmentError(ValueError):
    """The flipped prompt's tokens do not line up with the original prompt's outside the subject."""


# ---------------------------------------------------------------------------------------------------- set-up
@dataclass
class _Setup:
    kind: str
    hook: str  # e.g. "hook_mlp_out"
    window: int
    L: int
    pt_tokens: tuple[str, ...]
    span: tuple[int, int]  # clean subject span
    tgt: Tensor  # [m]
    clean_seq: Tensor  # [N] prompt + target[:-1]
    np_clean: int
    corrupt_seq: Tensor  # [N'] corrupted prompt + target[:-1]
    np_corrupt: int
    pos_map: dict[int, int]  # traced clean token t -> corrupted position t'
    clean_acts: Tensor  # [L, N, d] clean outputs of `hook`
    p_clean: float
    samples: int
    embed_hook: object | None  # hook_embed hook adding the noise (batch of `samples` rows), or None
    sigma: float | None
    corrupt: str
    flip_subject: str | None
    contrast: int | None = None  # first token of a contrast object: also a logit-difference grid
    ld_clean: float = float("nan")
    ld_corrupt: float = float("nan")
    ld_grid: Tensor | None = None  # [T, L] logit(o_1) − logit(contrast_1) at the first target position


def _logit_diff(logits_at_targets: Tensor, st: _Setup) -> Tensor:
    """``[B]`` logit of the target's first token minus the contrast's, at the first target position."""
    first = logits_at_targets[:, 0].float()
    return first[:, int(st.tgt[0])] - first[:, st.contrast]


def _validate(kind: str, window: int | None, algorithm: str | None = None) -> int:
    check_choice(kind, TRACING_KINDS, "tracing kind", UnknownKindError)
    if algorithm is not None:
        check_choice(algorithm, TRACING_ALGORITHMS, "tracing algorithm", UnknownAlgorithmError)
    if window is None:
        window = TRACING_KINDS[kind].default_window
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if kind == "resid" and window != 1:
        raise ValueError("kind='resid' restores the whole residual stream: use window=1")
    return window


def _seq_prob(logits_at_targets: Tensor, tgt: Tensor) -> Tensor:
    """``[B, m, V]`` logits at the m teacher-forced positions → ``[B]`` p = exp(Σ log p(o_i))."""
    logp = logits_at_targets.float().log_softmax(-1)
    idx = tgt.to(logp.device).view(1, -1, 1).expand(logp.shape[0], -1, 1)
    return logp.gather(-1, idx).squeeze(-1).sum(-1).exp()


def _target_positions(n_prompt: int, m: int) -> Tensor:
    return torch.arange(n_prompt - 1, n_prompt - 1 + m)


def check_flip(model: HookedTransformer, prompt: str, subject: str, flip_subject: str) -> None:
    """Raise :class:`FlipAlignmentError` unless ``prompt`` with ``subject`` replaced by ``flip_subject`` lines up with
    ``prompt`` token by token outside the subject (the alignment a flip trace needs)."""
    _flip_alignment(model, prompt, subject, flip_subject, locate_subject(model, prompt, subject), None)


def _flip_alignment(model, prompt, subject, flip_subject, pt, tgt):
    i = prompt.find(subject)
    flipped = prompt[:i] + flip_subject + prompt[i + len(subject) :]
    if flipped.find(flip_subject) != i:
        raise FlipAlignmentError(f"flip_subject {flip_subject!r} occurs earlier in the flipped prompt {flipped!r}")
    fpt = locate_subject(model, flipped, flip_subject)
    (s0, s1), (f0, f1) = pt.subject_span, fpt.subject_span
    if s0 != f0 or not torch.equal(pt.tokens[:s0], fpt.tokens[:f0]):
        raise FlipAlignmentError(f"tokens before the subject differ between {prompt!r} and {flipped!r}")
    if not torch.equal(pt.tokens[s1:], fpt.tokens[f1:]):
        raise FlipAlignmentError(f"tokens after the subject differ between {prompt!r} and {flipped!r}")
    pos_map = {}
    for t in range(s0, pt.n_tokens):
        if t >= s1:
            pos_map[t] = t - s1 + f1
        else:  # subject tokens align by their distance to the subject's end; no counterpart → not traced
            tp = f1 - (s1 - t)
            if tp >= f0:
                pos_map[t] = tp
    return fpt, pos_map


@torch.no_grad()
def _prepare(
    model, prompt, subject, target, kind, window, corruption: GaussianNoise | SubjectFlip, contrast: str | None = None
) -> _Setup:
    pt = locate_subject(model, prompt, subject)
    tgt = target_tokens(model, target)
    hook = TRACING_KINDS[kind].hook
    L, d = model.cfg.n_layers, model.cfg.d_model
    clean_seq = torch.cat([pt.tokens, tgt[:-1]])
    s0, s1 = pt.subject_span
    if isinstance(corruption, GaussianNoise):
        noise = corruption.resolve(model)
        samples, sig = noise.samples, noise.sigma
        eps = noise.draw(s1 - s0, d, model.cfg.device, model.cfg.dtype)
        embed_hook = noise_hook([(s0, s1)] * samples, list(eps))
        corrupt_seq, np_corrupt = clean_seq, pt.n_tokens
        pos_map = {t: t for t in range(s0, pt.n_tokens)}
        flip_subject = None
    else:
        flip_subject = corruption.subject
        fpt, pos_map = _flip_alignment(model, prompt, subject, flip_subject, pt, tgt)
        corrupt_seq, np_corrupt = torch.cat([fpt.tokens, tgt[:-1]]), fpt.n_tokens
        samples, sig, embed_hook = 1, None, None
    corrupt = corruption.kind

    names = [f"blocks.{l}.{hook}" for l in range(L)]
    logits, cache = scored_logits(model, clean_seq[None], _target_positions(pt.n_tokens, len(tgt)), cache_names=names)
    clean_acts = torch.stack([cache[n][0] for n in names])  # [L, N, d]
    p_clean = float(_seq_prob(logits, tgt)[0])
    st = _Setup(
        kind, hook, window, L, pt.str_tokens, pt.subject_span, tgt, clean_seq, pt.n_tokens, corrupt_seq,
        np_corrupt, pos_map, clean_acts, p_clean, samples, embed_hook, sig, corrupt, flip_subject,
    )
    if contrast is not None:
        st.contrast = int(target_tokens(model, contrast)[0])
        st.ld_clean = float(_logit_diff(logits, st)[0])
        st.ld_grid = torch.full((pt.n_tokens, L), float("nan"), dtype=torch.float64)
    return st


def _corrupt_hooks(st: _Setup) -> list:
    return [("hook_embed", st.embed_hook)] if st.embed_hook is not None else []


def _corrupt_batch(st: _Setup, device) -> Tensor:
    return st.corrupt_seq[None].expand(st.samples, -1).to(device)


@torch.no_grad()
def _corrupted_run(model, st: _Setup, cache_names=None):
    """The corrupted run (``samples`` rows): p_noised and optionally a cache."""
    toks = _corrupt_batch(st, model.cfg.device)
    tpos = _target_positions(st.np_corrupt, len(st.tgt))
    logits, cache = scored_logits(model, toks, tpos, fwd_hooks=_corrupt_hooks(st), cache_names=cache_names)
    if st.contrast is not None:
        st.ld_corrupt = float(_logit_diff(logits, st).mean())
        st.ld_grid.fill_(st.ld_corrupt)
    return float(_seq_prob(logits, st.tgt).mean()), cache


# ---------------------------------------------------------------------------------------------------- methods
def _layers_of(cells, t: int, L: int) -> list[int]:
    """Centre layers to compute for token t: all, or those listed in ``cells`` (a {t: [l, ...]} restriction)."""
    if cells is None:
        return list(range(L))
    return sorted(set(cells.get(t, ())))

@torch.no_grad()
def _grid_naive(model, st: _Setup, p_noised: float, cells=None) -> Tensor:
    grid = torch.full((len(st.pt_tokens), st.L), p_noised, dtype=torch.float64)
    toks = _corrupt_batch(st, model.cfg.device)
    tpos = _target_positions(st.np_corrupt, len(st.tgt))
    for t, tp in st.pos_map.items():
        for l in _layers_of(cells, t, st.L):
            hooks = list(_corrupt_hooks(st))
            for j in window_layers(l, st.window, st.L):
                clean = st.clean_acts[j, t]

                def restore(act, hook, clean=clean, tp=tp):
                    act[:, tp] = clean
                    return act

                hooks.append((f"blocks.{j}.{st.hook}", restore))
            logits, _ = scored_logits(model, toks, tpos, fwd_hooks=hooks)
            grid[t, l] = float(_seq_prob(logits, st.tgt).mean())
            if st.contrast is not None:
                st.ld_grid[t, l] = float(_logit_diff(logits, st).mean())
    return grid


def _exact_cache_names(model, st, runner: SuffixRunner) -> list[str]:
    """Activations of the corrupted run the exact grid reads: per block resid_pre and the attention keys/values;
    with the lean backend also what the late join needs (see :func:`_join_state`)."""
    L = st.L
    names = [f"blocks.{j}.{h}" for j in range(L) for h in ("hook_resid_pre", "attn.hook_k", "attn.hook_v")]
    if runner.is_lean:
        names.append(f"blocks.{L - 1}.hook_resid_post")
        if model.cfg.parallel_attn_mlp and st.kind in ("mlp", "attn"):
            names += [f"blocks.{j}.{st.hook}" for j in range(L)]
        elif not model.cfg.parallel_attn_mlp and st.kind == "mlp":
            names += [f"blocks.{j}.hook_resid_mid" for j in range(L)]
    return names


def _join_state(model, st: _Setup, cache, t: int, tp: int, a: int) -> Tensor:
    """The corrupted residual entering block a + 1 (positions tp.. of every noise sample) with the restoration of
    token t at block a applied — the state a cell joins at when the window starts at a.

    Restoring token t's output at layer a changes, within block a, only position t (the other positions' keys and
    values there come from the unchanged resid_pre(a)); so a cell can join at block a + 1:
    mlp (sequential): resid_mid(a)[t] + clean; mlp or attn (parallel attn/MLP, both added to resid_pre):
    resid_post(a)[t] − corrupted + clean; attn (sequential): the block's own MLP (:func:`tracer.lean.mlp_out`,
    post-normed in Gemma's blocks) on resid_pre(a)[t] + clean;
    resid: clean.
    """
    L = st.L
    post = cache[f"blocks.{a + 1}.hook_resid_pre"] if a + 1 < L else cache[f"blocks.{L - 1}.hook_resid_post"]
    x = post[:, tp:].clone()
    clean = st.clean_acts[a, t]
    if st.kind == "resid":
        x[:, 0] = clean
    elif model.cfg.parallel_attn_mlp:
        x[:, 0] = post[:, tp] - cache[f"blocks.{a}.{st.hook}"][:, tp] + clean
    elif st.kind == "mlp":
        x[:, 0] = cache[f"blocks.{a}.hook_resid_mid"][:, tp] + clean
    else:
        mid = cache[f"blocks.{a}.hook_resid_pre"][:, tp : tp + 1] + clean
        x[:, 0] = (mid + mlp_out(model, a, mid))[:, 0]
    return x


@torch.no_grad()
def _grid_exact(
    model, st: _Setup, p_noised: float, cache, batch_size: int, runner: SuffixRunner, cells_sel=None
) -> Tensor:
    """The exact grid (module docstring) through :class:`tracer.suffix.SuffixRunner`. With the lean backend a cell
    joins one block after its window's first layer (:func:`_join_state`); with TransformerLens blocks it joins at
    the window's first layer and the restoration happens inside that block."""
    L, S = st.L, st.samples
    late = runner.is_lean
    grid = torch.full((len(st.pt_tokens), L), p_noised, dtype=torch.float64)
    prefix = [runner.prefix(j, cache[f"blocks.{j}.attn.hook_k"], cache[f"blocks.{j}.attn.hook_v"]) for j in range(L)]
    m = len(st.tgt)
    dev = cache["blocks.0.hook_resid_pre"].device
    sample_rows = torch.arange(S, device=dev)
    cells_per_chunk = max(1, batch_size // S)
    for t, tp in st.pos_map.items():
        rel_tpos = (_target_positions(st.np_corrupt, m) - tp).to(dev)  # scored positions within the suffix
        layers = _layers_of(cells_sel, t, L)
        for c0 in range(0, len(layers), cells_per_chunk):
            cells = layers[c0 : c0 + cells_per_chunk]  # sorted centre layers → sorted join layers
            if not cells:
                continue
            wins = [window_layers(l, st.window, L) for l in cells]
            if late:
                joins = [w.start + 1 for w in wins]
                x = torch.cat([_join_state(model, st, cache, t, tp, w.start) for w in wins])
            else:
                joins = [w.start for w in wins]
                x = torch.cat([cache[f"blocks.{a}.hook_resid_pre"][:, tp:] for a in joins])
            # x: [cells·S, P, d], cell-major rows; cells whose join layer is later are stacked below
            for j in range(min(joins), L):
                n_cells = sum(1 for a in joins if a <= j)
                n = n_cells * S
                restored = [c for c in range(n_cells) if j in wins[c] and j >= joins[c]]
                restore = None
                if restored:
                    mask = torch.zeros(n, dtype=torch.bool, device=dev)
                    for c in restored:
                        mask[c * S : (c + 1) * S] = True
                    restore = Restore(st.kind, mask, 0, st.clean_acts[j, t])
                qpos = rel_tpos if j == L - 1 else None
                out = runner.block(j, x[:n], prefix[j], starts=tp, rows=sample_rows.repeat(n_cells),
                                   query_positions=qpos, restore=restore)
                if qpos is None:
                    x[:n] = out
                else:  # last block: only the scored positions remain
                    x = torch.cat([out, x[n:, rel_tpos]]) if n < x.shape[0] else out
            final = x if min(joins) < L else x[:, rel_tpos]  # cells joining after the last block skip it
            logits = logits_from_resid(model, final)
            p = _seq_prob(logits, st.tgt).view(len(cells), S).mean(-1)
            grid[t, cells] = p.double().cpu()
            if st.contrast is not None:
                st.ld_grid[t, cells] = _logit_diff(logits, st).view(len(cells), S).mean(-1).double().cpu()
    return grid


def _grid_attribution(model, st: _Setup, p_noised: float) -> Tensor:
    L, S = st.L, st.samples
    toks = _corrupt_batch(st, model.cfg.device)
    tpos = _target_positions(st.np_corrupt, len(st.tgt))
    n, d = toks.shape[1], model.cfg.d_model
    deltas = [torch.zeros(S, n, d, device=model.cfg.device, dtype=model.cfg.dtype, requires_grad=True) for _ in range(L)]
    acts: dict[int, Tensor] = {}

    def make_hook(j):
        def add(act, hook):
            acts[j] = act.detach()
            return act + deltas[j]

        return add

    hooks = _corrupt_hooks(st) + [(f"blocks.{j}.{st.hook}", make_hook(j)) for j in range(L)]
    with torch.enable_grad():
        logits, _ = scored_logits(model, toks, tpos, fwd_hooks=hooks)
        objective = _seq_prob(logits, st.tgt).mean()  # mean over noise samples of p_s
        grads = torch.autograd.grad(objective, deltas)
    # contrib[j, t] = Σ_s ∇_{h_j^s(t')} (mean_s p_s) · (h_j^clean(t) − h_j^s(t'))
    contrib = torch.zeros(L, len(st.pt_tokens), dtype=torch.float64)
    for t, tp in st.pos_map.items():
        for j in range(L):
            diff = st.clean_acts[j, t][None] - acts[j][:, tp]
            contrib[j, t] = float((grads[j][:, tp].double() * diff.double()).sum())
    grid = torch.full((len(st.pt_tokens), L), p_noised, dtype=torch.float64)
    for t in st.pos_map:
        for l in range(L):
            w = window_layers(l, st.window, L)
            grid[t, l] = p_noised + float(contrib[w.start : w.stop, t].sum())
    return grid


# ---------------------------------------------------------------------------------------------------- public
def _trace_corruption(noise, sigma, samples, seed, corrupt, flip_subject) -> Corruption:
    """The corruption object ``trace``'s arguments describe (the one reading: :func:`tracer.corruption.as_corruption`
    for ``noise``; ``corrupt``/``flip_subject`` are the keyword spellings of a flip or a zeroing)."""
    if corrupt is not None:
        check_choice(corrupt, CORRUPTIONS, "corruption kind")
    if corrupt == "flip" or (corrupt is None and flip_subject is not None):
        return SubjectFlip(flip_subject if flip_subject is not None else "")
    if corrupt == "zero":
        return Zeroing()
    return as_corruption(noise, sigma=sigma, samples=samples, seed=seed)


@jaxtyped(typechecker=beartype)
def trace(
    model: HookedTransformer,
    prompt: str,
    subject: str,
    target: str,
    *,
    kind: str = "mlp",
    window: int | None = None,
    noise: float | int | GaussianNoise | SubjectFlip | Zeroing | Float[Tensor, "samples n_subject d_model"] = 3.0,
    samples: int = 10,
    sigma: float | int | None = None,
    seed: int = 0,
    algorithm: str = "exact",
    corrupt: str | None = None,
    flip_subject: str | None = None,
    batch_size: int = _DEFAULT_BATCH,
    cells: dict[int, list[int]] | None = None,
    contrast: str | None = None,
) -> TraceResult:
    """Causal trace of ``target`` after ``prompt`` with ``subject`` corrupted: a ``[T, L]`` grid of restored
    probabilities (Meng et al. 2022; Hase et al. 2023 §3.2).

    grid[t, l] = mean_s p(o | s_noise^(s), r; h_j(t) := h_j^clean(t) for j in window(l)), with
    window(l) = :func:`tracer.vocab.window_layers` and h the output ``kind`` restores
    (:data:`tracer.vocab.TRACING_KINDS`: "mlp" ``blocks.{j}.hook_mlp_out``, "attn" ``hook_attn_out``, "resid"
    ``hook_resid_post``). Fractional effect (§4.1): ``res.fractional()`` (:mod:`tracer.effects`).

    Args:
        model: a HookedTransformer (a BOS token only where its profile says so).
        prompt, subject, target: the fact; ``subject`` must occur in ``prompt`` (first occurrence, located by
            character offsets); ``target`` gets its own leading space (``" French"``); multi-token targets are
            teacher-forced, p = exp(Σ log p(o_i | P, o_<i)).
        kind: "mlp" | "attn" | "resid".
        window: layers restored per cell; default the kind's (5 for mlp/attn, 1 for resid, which requires 1).
        noise: the corruption — a :class:`~tracer.corruption.GaussianNoise`, a
            :class:`~tracer.corruption.SubjectFlip`, a :class:`~tracer.corruption.Zeroing` (then this is
            :func:`zero`), a bare number (= ``GaussianNoise(scale=number)``: a multiplier of the s3 rule's std,
            default 3, ROME's rule), or an explicit ``[samples, n_subject, d_model]`` noise tensor.
        samples, sigma, seed: with a number for ``noise``: the noise samples, an absolute σ overriding the
            scale (e.g. 0.094 for GPT-J), the seed of the single draw reused for every cell.
        algorithm: "exact" (fast, = naive to ~1e-6), "naive" (one forward per cell), "attribution"
            (first-order estimate, see module docstring; grid = p_noised + estimated Δp).
        corrupt, flip_subject: keyword spelling of the corruption kind ("noise" | "flip" | "zero"); for flip,
            the grid's rows are the *original* prompt's tokens; the corrupted run uses the flipped prompt; tokens
            before the subject and after it align one-to-one (else :class:`FlipAlignmentError`), subject tokens
            align from the subject's end (last ↔ last); original subject tokens without a counterpart (flip
            subject shorter) are not traced (row = p_noised, ``traced`` False).
        batch_size: rows (cells × samples) per stacked forward of the exact algorithm (memory knob).
        cells: optional ``{token_index: [centre layers]}`` restriction of the cells computed by "exact" and
            "naive" (for spot checks and tests); cells left out are NaN in the grid.
        contrast: a second object (e.g. a flip partner's, ``" English"``): "exact" and "naive" then also record
            the logit difference logit(o_1) − logit(contrast_1) at the first target position per cell (Zhang &
            Nanda 2023's metric for replacement-style patching) in ``extra["logit_diff"]`` (``grid``, ``clean``,
            ``corrupt``), from the same forward passes.

    Returns:
        :class:`TraceResult` with ``grid`` ``[T, L]`` (float64, T = prompt tokens), rows before the subject
        (and untraced rows) equal to p_noised.

    Raises:
        SubjectNotFoundError, EmptyTargetError, UnknownKindError, UnknownAlgorithmError, FlipAlignmentError,
        ValueError (bad window / samples / corruption) — all ValueError subclasses.
    """
    warn_unspaced_target(target)
    corruption = _trace_corruption(noise, sigma, samples, seed, corrupt, flip_subject)
    if isinstance(corruption, Zeroing):
        return zero(model, prompt, subject, target, kind=kind, window=window, per_token=corruption.per_token)
    window = _validate(kind, window, algorithm)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    st = _prepare(model, prompt, subject, target, kind, window, corruption, contrast if algorithm != "attribution" else None)
    if algorithm == "exact":
        runner = SuffixRunner(model, lean=lean_supported(model))
        p_noised, cache = _corrupted_run(model, st, _exact_cache_names(model, st, runner))
        grid = _grid_exact(model, st, p_noised, cache, batch_size, runner, cells)
    elif algorithm == "naive":
        p_noised, _ = _corrupted_run(model, st)
        grid = _grid_naive(model, st, p_noised, cells)
    else:
        p_noised, _ = _corrupted_run(model, st)
        grid = _grid_attribution(model, st, p_noised)
    traced = torch.zeros(len(st.pt_tokens), dtype=torch.bool)
    traced[list(st.pos_map)] = True
    if cells is not None and algorithm != "attribution":
        keep = torch.zeros_like(grid, dtype=torch.bool)
        keep[~traced] = True
        for t, ls in cells.items():
            keep[t, list(ls)] = True
        grid = grid.masked_fill(~keep, float("nan"))
    return TraceResult(
        tokens=st.pt_tokens,
        subject_span=st.span,
        grid=grid,
        p_clean=st.p_clean,
        p_noised=p_noised,
        kind=kind,
        window=window,
        algorithm=algorithm,
        sigma=st.sigma,
        samples=st.samples,
        corrupt=st.corrupt,
        traced=traced,
        prompt=prompt,
        subject=subject,
        target=target,
        flip_subject=st.flip_subject,
        extra={} if st.contrast is None else {"logit_diff": {
            "contrast": contrast, "grid": st.ld_grid.tolist(), "clean": st.ld_clean, "corrupt": st.ld_corrupt}},
    )


@jaxtyped(typechecker=beartype)
@torch.no_grad()
def zero(
    model: HookedTransformer,
    prompt: str,
    subject: str,
    target: str,
    *,
    kind: str = "mlp",
    window: int | None = None,
    per_token: bool = False,
    algorithm: str = "exact",
    batch_size: int = 64,
) -> TraceResult:
    """Representation zeroing (Hase et al. 2023 App. B): on the *clean* run, set the ``kind`` outputs to 0 at the
    subject tokens for the window of layers around each layer l, and measure the share of p_clean deleted.

    grid[t, l] = p(o | P; h_j(t*) := 0 for j in window(l), t* in Z_t), where Z_t = all subject tokens
    (``per_token=False``, the paper's variant: every subject row of the grid holds the same value) or Z_t = {t}
    for each token t from the subject's first token on (``per_token=True``). Untouched rows (before the subject,
    and non-subject rows when ``per_token=False``) hold p_clean. ``res.fractional()`` =
    clip((p_clean − grid) / p_clean, 0, 1), the deleted fraction (:mod:`tracer.effects`); ``corrupt`` is "zero",
    ``p_noised`` None (there is no corrupted run). ``trace(..., noise=Zeroing(per_token))`` calls this.

    ``algorithm``: "exact" (default) reuses the clean run: positions before min(Z_t) never change, so each cell
    runs only positions min(Z_t).. from its window's first layer on, attending to the clean run's cached keys and
    values of the earlier positions (:class:`tracer.suffix.SuffixRunner`), cells of a token set stacked as rows;
    "naive": one full forward per cell (batched). They agree to float rounding (tests assert < 1e-5).
    """
    window = _validate(kind, window)
    check_choice(algorithm, ("exact", "naive"), "zeroing algorithm", UnknownAlgorithmError)
    pt = locate_subject(model, prompt, subject)
    tgt = target_tokens(model, target)
    L, T = model.cfg.n_layers, pt.n_tokens
    s0, s1 = pt.subject_span
    seq = torch.cat([pt.tokens, tgt[:-1]]).to(model.cfg.device)
    tpos = _target_positions(T, len(tgt))
    token_sets = [list(range(s0, s1))] if not per_token else [[t] for t in range(s0, T)]
    if algorithm == "exact":
        p_clean, probs = _zero_exact(model, seq, tpos, tgt, token_sets, kind, window, batch_size)
    else:
        p_clean, probs = _zero_naive(model, seq, tpos, tgt, token_sets, kind, window, batch_size)
    grid = torch.full((T, L), p_clean, dtype=torch.float64)
    traced = torch.zeros(T, dtype=torch.bool)
    if per_token:
        grid[s0:] = probs.view(T - s0, L)
        traced[s0:] = True
    else:
        grid[s0:s1] = probs.view(1, L)
        traced[s0:s1] = True
    return TraceResult(
        tokens=pt.str_tokens,
        subject_span=pt.subject_span,
        grid=grid,
        p_clean=p_clean,
        p_noised=None,
        kind=kind,
        window=window,
        algorithm=algorithm,
        sigma=None,
        samples=1,
        corrupt="zero",
        traced=traced,
        prompt=prompt,
        subject=subject,
        target=target,
        extra={"per_token": per_token},
    )


def _zero_naive(model, seq, tpos, tgt, token_sets, kind, window, batch_size) -> tuple[float, Tensor]:
    L = model.cfg.n_layers
    p_clean = float(_seq_prob(scored_logits(model, seq[None], tpos)[0], tgt)[0])
    cells = [(i, l) for i in range(len(token_sets)) for l in range(L)]
    probs = torch.empty(len(cells), dtype=torch.float64)
    for c0 in range(0, len(cells), batch_size):
        chunk = cells[c0 : c0 + batch_size]
        masks = torch.zeros(L, len(chunk), seq.shape[0], dtype=torch.bool)
        for r, (i, l) in enumerate(chunk):
            for j in window_layers(l, window, L):
                masks[j, r, token_sets[i]] = True
        masks = masks.to(model.cfg.device)

        def make_hook(j):
            def zero_out(act, hook):
                return act.masked_fill(masks[j][..., None], 0.0)

            return zero_out

        hooks = [(f"blocks.{j}.{TRACING_KINDS[kind].hook}", make_hook(j)) for j in range(L)]
        logits, _ = scored_logits(model, seq[None].expand(len(chunk), -1), tpos, fwd_hooks=hooks)
        probs[c0 : c0 + len(chunk)] = _seq_prob(logits, tgt).double().cpu()
    return p_clean, probs


def _zero_exact(model, seq, tpos, tgt, token_sets, kind, window, batch_size) -> tuple[float, Tensor]:
    """Zeroing cells from the clean run's cache: for token set Z (suffix from p = min Z) and centre layer l, rows
    join at block a = window(l).start with the clean resid_pre(a)[p:], and the kind's output is zeroed at Z inside
    every block of the window (:class:`tracer.suffix.Restore` with zeros); cells of one token set are stacked in
    order of their join layer."""
    L, d = model.cfg.n_layers, model.cfg.d_model
    runner = SuffixRunner(model, lean=lean_supported(model))
    names = [f"blocks.{j}.{h}" for j in range(L) for h in ("hook_resid_pre", "attn.hook_k", "attn.hook_v")]
    logits, cache = scored_logits(model, seq[None], tpos, cache_names=names)
    p_clean = float(_seq_prob(logits, tgt)[0])
    prefix = [runner.prefix(j, cache[f"blocks.{j}.attn.hook_k"], cache[f"blocks.{j}.attn.hook_v"]) for j in range(L)]
    dev = cache["blocks.0.hook_resid_pre"].device
    zeros = torch.zeros(d, device=dev, dtype=cache["blocks.0.hook_resid_pre"].dtype)
    probs = torch.empty(len(token_sets) * L, dtype=torch.float64)
    for i, zset in enumerate(token_sets):
        p = min(zset)
        local = tuple(z - p for z in zset)
        rel_tpos = (tpos - p).to(dev)
        for c0 in range(0, L, batch_size):
            cells = list(range(c0, min(L, c0 + batch_size)))  # centre layers, sorted → join layers sorted
            wins = [window_layers(l, window, L) for l in cells]
            joins = [w.start for w in wins]
            x = torch.cat([cache[f"blocks.{a}.hook_resid_pre"][:, p:] for a in joins])  # [cells, P, d]
            for j in range(min(joins), L):
                n = sum(1 for a in joins if a <= j)
                mask = torch.tensor([j in wins[c] for c in range(n)], device=dev)
                restore = Restore(kind, mask, local, zeros) if bool(mask.any()) else None
                qpos = rel_tpos if j == L - 1 else None
                out = runner.block(j, x[:n], prefix[j], starts=p, rows=torch.zeros(n, dtype=torch.long, device=dev),
                                   query_positions=qpos, restore=restore)
                x = out if qpos is not None else torch.cat([out, x[n:]])
            probs[i * L + c0 : i * L + c0 + len(cells)] = _seq_prob(logits_from_resid(model, x), tgt).double().cpu()
    return p_clean, probs


def flop_fraction(
    n_layers: int,
    window: int,
    n_prompt: int,
    subject_start: int,
    n_target: int,
    d_model: int,
    n_block_params: int,
    d_vocab: int,
) -> float:
    """Theoretical FLOPs of the exact grid relative to the naive one (matmul FLOPs, 2 per multiply-add,
    attention score/value FLOPs included; the corrupted run and the clean run are counted for both).

    naive: every traced cell runs all L blocks on all N = n_prompt + n_target − 1 positions and unembeds N
    positions; exact: a cell (t, l) with window start a runs blocks a+1..L−1 on positions t..N−1 (attending to
    t..N−1 plus the cached prefix; block a changes only position t, which costs no block pass for "mlp"/"resid"
    and one position's MLP for "attn", not counted) and unembeds n_target positions. The last block's saving
    (only the target positions need its queries and MLP) is not counted either, so this slightly overstates exact.
    """
    N = n_prompt + n_target - 1

    def block(q_len, k_len):
        return 2 * n_block_params // n_layers * q_len + 4 * d_model * q_len * k_len

    unembed = 2 * d_model * d_vocab
    base = 2 * (n_layers * block(N, N) + N * unembed)  # clean + corrupted runs
    naive = exact = base
    for t in range(subject_start, n_prompt):
        for l in range(n_layers):
            a = window_layers(l, window, n_layers).start
            naive += n_layers * block(N, N) + N * unembed
            exact += (n_layers - a - 1) * block(N - t, N) + n_target * unembed
    return exact / naive
