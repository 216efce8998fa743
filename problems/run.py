"""``run_edit``: edit one fact for one problem with one method at one layer, and score every metric.

Scoring (all target probabilities teacher-forced through :func:`tracer.probs.target_probs`, batched: one call for
the clean prompts and one for the noised ones, before the edit and again inside the edit context):

* rewrite: p(target | fact.prompt); paraphrase: p(target | each paraphrase), averaged over *all* paraphrases
  (``paraphrase_score_first`` keeps the reference code's first-only value). Fact Erasure uses the erasure form.
  Fact Forcing scores these prompts on the noised subject (the noise at each prompt's own subject tokens, mean of p
  over the noise samples); paraphrases that do not contain the subject verbatim (some zsRE rephrasings) are then
  left out.
* neighborhood: 1 − |p* − p|/(0.5 + |p − 0.5|) with p = p(edit target | neighbour prompt) — the paper's formula
  with the edit target in place of o_false (for Error Injection these coincide). Rationale: a neighbour prompt
  moving towards/away from the very object the edit pushes is the over-generalisation the metric is meant to catch
  (for Fact Erasure/Amplification that object is o_true, which CounterFact neighbours share). Neighbour prompts are
  always clean (their subject is a different entity). ``neighborhood_score_first``: first prompt only.
* overall: mean of rewrite, paraphrase, neighborhood (Hase et al.); ``overall_hmean``: harmonic mean of the three,
  each clipped to [0, 1] (Meng et al.'s aggregation); ``meng_score``: harmonic mean of ES, PS, NS.
* essence: 5 top-k-5 samples of 20 tokens from "{subject} is a", sampled *before* the edit (cached on disk),
  perplexity before and after; score 1 − clip(Δppl, 0, 5)/5.
* Meng et al.'s unscaled metrics with the problem's (new, old) pair (see :mod:`problems.variants`): efficacy
  success/magnitude on the rewrite prompt, paraphrase success/magnitude averaged over paraphrases, neighborhood
  success/magnitude with the inequality reversed (p(neighbour's true object) > p(the pair's other object)). NaN when
  the fact lacks an object of the pair (e.g. o_false on known_1000).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from transformer_lens import HookedTransformer

from locedit.problems import metrics as M
from locedit.problems.essence import essence_perplexity, essence_texts
from locedit.problems.fluency import generation_entropy, unedited_generation_entropy
from locedit.problems.facts import Fact
from locedit.problems.variants import default_noise, problem_hparams, resolve_problem
from locedit.tracer.corruption import GaussianNoise
from locedit.tracer.forward import ResidCheckpoints
from locedit.tracer.probs import target_probs
from locedit.tracer.tokens import UnspacedTargetWarning, locate_subject
from locedit.editors.tokens import DEFAULT_EDIT_TOKEN, token_position

__all__ = ["EditOutcome", "PreEdit", "ScoringCheckpoints", "pre_edit", "run_edit"]


@dataclass(frozen=True)
class EditOutcome:
    """One edit's flat record (one row of the edit-outcomes table). Probabilities of paraphrase/neighbour prompts
    are means over the prompts; ``seconds`` is the whole run (scoring included), ``edit_seconds`` the edit alone;
    ``update_norm`` is the Frobenius norm of all weight changes (a collapse diagnostic: ROME's "disabling" edits).
    ``opt_*``: how the edit's optimisation ended (:class:`editors.deltas.Convergence`: final loss, steps, mean
    p(target) over its optimisation prompts, ‖δ‖/‖v_init‖ and whether the clamp bound was active for ROME / r-ROME
    / MEMIT, the share of entries at the L∞ bound for FT). ``rewrite_score_heldout_noise``: Fact Forcing whose edit
    optimised over only the first ``edit_samples`` noise draws: the rewrite score on the draws it did not see (its
    transfer to unseen noise; NaN otherwise, when the rewrite score is already on the draws the edit optimised)."""

    fact_id: str
    problem: str
    method: str
    layer: int
    layers: tuple[int, ...]
    token: str
    token_index: int
    target: str
    objective: str
    rewrite_score: float
    paraphrase_score: float
    neighborhood_score: float
    overall_score: float
    overall_hmean: float
    essence_score: float
    paraphrase_score_first: float
    neighborhood_score_first: float
    p_rewrite_pre: float
    p_rewrite_post: float
    p_paraphrase_pre: float
    p_paraphrase_post: float
    p_neighborhood_pre: float
    p_neighborhood_post: float
    ppl_pre: float
    ppl_post: float
    efficacy_success: float
    efficacy_magnitude: float
    paraphrase_success: float
    paraphrase_magnitude: float
    neighborhood_success: float
    neighborhood_magnitude: float
    meng_score: float
    n_paraphrases: int
    n_neighborhood: int
    update_norm: float
    fluency_pre: float
    fluency_post: float
    edit_seconds: float
    seconds: float
    opt_final_loss: float = math.nan
    opt_steps: int = 0
    opt_p_target: float = math.nan
    opt_delta_ratio: float = math.nan
    opt_clamped: float = math.nan
    opt_bound_share: float = math.nan
    rewrite_score_heldout_noise: float = math.nan

    def as_row(self) -> dict:
        """A plain dict (``layers`` as a list) ready for ``polars.DataFrame([o.as_row() for o in outcomes])``."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else math.nan


class _Scorer:
    """Collects (prompt, target, noised) queries and scores them all in two batched calls."""

    def __init__(self, model: HookedTransformer, subject: str, noise: GaussianNoise | None):
        self.model, self.subject, self.noise = model, subject, noise
        self.keys: list[tuple[str, str, bool]] = []

    def add(self, prompt: str, target: str | None, noised: bool = False) -> None:
        if target is not None and (prompt, target, noised) not in self.keys:
            self.keys.append((prompt, target, noised))

    @torch.no_grad()
    def run(self, checkpoints: ScoringCheckpoints | None = None,
            changed_from: int | None = None) -> dict[tuple[str, str, bool], float]:
        """p of every query: recording the unedited passes at ``checkpoints`` (``changed_from`` None), or rerunning
        them from the checkpoint at or below block ``changed_from`` (inside an edit of blocks ``changed_from..``)."""
        out: dict[tuple[str, str, bool], float] = {}
        for noised in (False, True):
            ks = [k for k in self.keys if k[2] == noised]
            if not ks:
                continue
            p = target_probs(
                self.model,
                [k[0] for k in ks],
                [k[1] for k in ks],
                subjects=[self.subject] * len(ks) if noised else None,
                noise=self.noise if noised else None,
                checkpoints=None if checkpoints is None else checkpoints.of(noised),
                changed_from=changed_from,
            )
            out.update({k: float(v) for k, v in zip(ks, p.tolist())})
        return out


class ScoringCheckpoints:
    """A fact's scoring passes (clean queries, noised queries, essence texts) recorded on the unedited model at the
    input of ``layers`` (:class:`tracer.forward.ResidCheckpoints`), so that each edit's post-edit scoring reruns
    only the blocks from its lowest edited layer (the checkpoint at or below it) up — equal to scoring through the
    whole model, since nothing below an edited block changes."""

    def __init__(self, layers: Sequence[int]):
        self.layers = tuple(sorted(set(layers)))
        self._by = {which: ResidCheckpoints(self.layers) for which in (False, True, "essence")}

    def of(self, which: bool | str) -> ResidCheckpoints:
        """The checkpoints of the clean (False) or noised (True) queries, or of the essence texts ("essence")."""
        return self._by[which]


@dataclass(frozen=True)
class PreEdit:
    """What a fact's edits for one problem share before any edit: the problem's target and scoring pair, the scored
    prompts, their pre-edit probabilities, the essence texts and pre-edit perplexity and fluency. Computed once by
    :func:`pre_edit` and passed to every :func:`run_edit` of the fact and problem (``pre=``), whatever the method,
    layer or token; equal to what each edit would compute itself (the model is the same, unedited, model).
    ``checkpoints``: the unedited scoring passes' residual streams at the study's lowest edited layers
    (:class:`ScoringCheckpoints`; None: post-edit scoring runs the whole model)."""

    fact_id: str
    problem: str
    sigma: float | None
    target: str
    new: str | None
    old: str | None
    rewrite: str
    paraphrases: tuple[str, ...]
    neighbors: tuple[str, ...]
    n_true: tuple[str, ...]
    n_other: str | None
    keys: tuple[tuple[str, str, bool], ...]
    scores: dict
    texts: object
    ppl_pre: float
    fluency_pre: float
    essence: bool
    generation: bool
    checkpoints: ScoringCheckpoints | None = None
    edit_samples: int | None = None
    p_rewrite_heldout: float = math.nan


def _heldout_noise(model: HookedTransformer, fact: Fact, snoise: GaussianNoise | None,
                   edit_samples: int | None) -> GaussianNoise | None:
    """The noise draws a Fact Forcing edit over the first ``edit_samples`` draws does not see (explicit values at the
    rewrite prompt's subject), or None when it sees them all."""
    if snoise is None or edit_samples is None or edit_samples >= snoise.samples:
        return None
    s, e = locate_subject(model, fact.prompt, fact.subject).subject_span
    eps = snoise.draw(e - s, model.cfg.d_model, "cpu", torch.float32)[edit_samples:]
    return replace(snoise, samples=int(eps.shape[0]), values=eps, of=None)


def _p_heldout(model, fact: Fact, target: str, held: GaussianNoise | None, **kw) -> float:
    if held is None:
        return math.nan
    return float(target_probs(model, [fact.prompt], [target], subjects=[fact.subject], noise=held, **kw)[0])


def pre_edit(model: HookedTransformer, fact: Fact, problem: str, noise: GaussianNoise | float | None = None,
             essence: bool = True, generation: bool = False, checkpoint_layers: Sequence[int] = (),
             edit_samples: int | None = None) -> PreEdit:
    """The pre-edit half of :func:`run_edit` for ``fact`` and ``problem`` (see :class:`PreEdit`); call it on the
    unedited model. ``checkpoint_layers``: the lowest edited layer of each edit that will use it (a study's; see
    :class:`ScoringCheckpoints`): its post-edit scoring then starts there instead of at the embedding.
    ``edit_samples``: as :func:`run_edit`'s (Fact Forcing: p(target) on the draws the edit will not see)."""
    prob = resolve_problem(problem)
    snoise = default_noise(model, noise) if prob.uses_noise else None
    target = prob.target(model, fact, snoise)
    new, old = prob.scoring_pair(model, fact, target, snoise)
    noised = prob.noised_input
    paraphrases = tuple(p for p in fact.paraphrases if not noised or fact.subject in p)
    neighbors = tuple(fact.neighborhood)
    n_true = tuple(fact.neighborhood_answers) if fact.neighborhood_answers else (fact.o_true,) * len(neighbors)
    n_other = old if new == fact.o_true else new  # the pair's object that is not o_true
    sc = _Scorer(model, fact.subject, snoise)
    for p in [fact.prompt, *paraphrases]:
        for t in (target, new, old):
            sc.add(p, t, noised)
    for p, tt in zip(neighbors, n_true):
        for t in (target, tt, n_other):
            sc.add(p, t, False)
    texts = essence_texts(model, fact.subject) if essence else None
    ckpt = ScoringCheckpoints(checkpoint_layers) if checkpoint_layers else None
    scores = sc.run(ckpt)
    return PreEdit(
        fact_id=fact.id, problem=problem, sigma=None if snoise is None else snoise.sigma, target=target, new=new,
        old=old, rewrite=fact.prompt, paraphrases=paraphrases, neighbors=neighbors, n_true=n_true, n_other=n_other,
        keys=tuple(sc.keys), scores=scores, texts=texts,
        ppl_pre=essence_perplexity(model, texts, checkpoints=ckpt and ckpt.of("essence")) if texts is not None
        else math.nan,
        fluency_pre=unedited_generation_entropy(model, fact.generation_prompts) if generation else math.nan,
        essence=essence, generation=generation, checkpoints=ckpt, edit_samples=edit_samples,
        p_rewrite_heldout=_p_heldout(model, fact, target, _heldout_noise(model, fact, snoise if noised else None,
                                                                        edit_samples)),
    )


def run_edit(
    model: HookedTransformer,
    fact: Fact,
    problem: str,
    method: str,
    layer: int,
    hparams=None,
    noise: GaussianNoise | float | None = None,
    essence: bool = True,
    edit_samples: int | None = None,
    generation: bool = False,
    token: str | int | None = DEFAULT_EDIT_TOKEN,
    pre: PreEdit | None = None,
    **edit_kwargs,
) -> EditOutcome:
    """Edit ``fact`` for ``problem`` with ``method`` at ``layer``, score, restore the weights, return the outcome.

    Args:
        problem: one of ``problems.PROBLEMS``.
        method: "rome", "memit", "ft-1" or "ft-5" (memit/ft-5 edit the 5-layer window centred on ``layer``).
        layer: the edit (centre) layer, in [0, n_layers).
        hparams: editor hyper-parameters; default: the editors' defaults with the problem's App. A overrides
            (:func:`problems.variants.problem_hparams`).
        noise: the subject noise for Tracing Reversal's o_noise and Fact Forcing: a
            :class:`~tracer.corruption.GaussianNoise`, or a bare number = its *scale* (a multiplier of the s3 rule's std,
            as in ``trace``), or None (scale 3, 10 samples, seed 0).
        edit_samples: Fact Forcing only: the edit optimizes over the first ``edit_samples`` noise samples of the
            same draw (a cost knob: the edit's cost grows linearly with the samples); scoring always uses all of
            them, so the rewrite score then also measures transfer to unseen noise draws. Default: all.
        essence: compute the essence score (costs sampling once per subject, cached, and two forward passes).
        generation: also score fluency before and after the edit (``fluency_pre``/``fluency_post``: Meng et al.'s
            generation entropy over the fact's ``generation_prompts``, :mod:`problems.fluency`); slow, off by
            default; NaN when off or when the fact has no generation prompts.
        token: ROME/MEMIT's edit position (:data:`editors.tokens.EDIT_TOKENS` or an int offset from the last subject
            token); recorded as ``token`` with ``token_index``, the position it names in the fact's prompt (the
            tracing grid's row for a token-level join). Methods without a key position (FT: ``token`` is ignored, None
            is accepted) record the default rule's row, the table's convention.
        pre: the fact's :func:`pre_edit` for ``problem`` with the same noise, essence and generation (a study
            computes it once per fact and problem, with checkpoints at its edits' lowest layers so that post-edit
            scoring reruns only the blocks from there); default: computed here (and the post-edit scores run the
            whole model).
        edit_kwargs: passed to :func:`editors.edit` (e.g. ``covariance=``, ``fast=``, ``targets=``).

    Raises:
        ValueError: unknown problem/method; ``LayerOutOfRangeError`` for a bad layer; ``MissingTargetError`` when the
        fact lacks the object the problem needs.
    """
    from locedit.editors import EditRequest, edit, method_layers, resolve_method

    t0 = time.perf_counter()
    prob = resolve_problem(problem)
    method = resolve_method(method, aliases=False).name
    layers = method_layers(method, model.cfg.n_layers, layer)
    token = resolve_method(method).edit_token(DEFAULT_EDIT_TOKEN if token is None else token)  # None: no key position
    recorded_token = DEFAULT_EDIT_TOKEN if token is None else token
    token_index = token_position(locate_subject(model, fact.prompt, fact.subject), recorded_token, fact.prompt)
    snoise = default_noise(model, noise) if prob.uses_noise else None
    if pre is None:
        pre = pre_edit(model, fact, problem, snoise, essence=essence, generation=generation, edit_samples=edit_samples)
    elif (pre.fact_id, pre.problem, pre.essence, pre.generation, pre.edit_samples) != \
            (fact.id, problem, essence, generation, edit_samples) or pre.sigma != (None if snoise is None else snoise.sigma):
        raise ValueError(f"pre= was computed for {pre.fact_id}/{pre.problem} (essence={pre.essence}, "
                         f"generation={pre.generation}, sigma={pre.sigma}, edit_samples={pre.edit_samples}), not for "
                         f"this edit of {fact.id}/{problem}")
    if hparams is None:
        hparams = problem_hparams(problem, method, model)

    noised = prob.noised_input
    target, new, old, rewrite = pre.target, pre.new, pre.old, pre.rewrite
    paraphrases, neighbors, n_true, n_other = list(pre.paraphrases), list(pre.neighbors), list(pre.n_true), pre.n_other
    sc = _Scorer(model, fact.subject, snoise)
    sc.keys = list(pre.keys)
    texts, ppl_pre, fluency_pre, ckpt = pre.texts, pre.ppl_pre, pre.fluency_pre, pre.checkpoints
    changed_from = min(layers) if ckpt is not None else None  # nothing below the lowest edited block changes
    request = EditRequest(template=fact.template, subject=fact.subject, target=target)
    with warnings.catch_warnings():  # targets here are the fact's or the model's own prediction (o_noise)
        warnings.simplefilter("ignore", UnspacedTargetWarning)
        with edit(
            model, request, method=method, layers=list(layers), hparams=hparams,
            objective=prob.objective, noise=snoise.prefix(edit_samples) if noised else None, token=token,
            **edit_kwargs,
        ) as result:
            post = sc.run(ckpt, changed_from)
            ppl_post = essence_perplexity(model, texts, checkpoints=ckpt and ckpt.of("essence"),
                                          changed_from=changed_from) if texts is not None else math.nan
            fluency_post = generation_entropy(model, fact.generation_prompts) if generation else math.nan
            held = _heldout_noise(model, fact, snoise if noised else None, edit_samples)
            p_heldout_post = _p_heldout(model, fact, target, held)
    p_heldout_pre = pre.p_rewrite_heldout
    pre = pre.scores
    edit_seconds = float(result.seconds)
    update_norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in result.deltas.values()))

    def probs(d, ps, t):
        return [d[(p, t, noised)] for p in ps] if t is not None else []

    score = M.erasure_score if prob.erase else M.rewrite_score
    r_pre, r_post = pre[(rewrite, target, noised)], post[(rewrite, target, noised)]
    pp_pre, pp_post = probs(pre, paraphrases, target), probs(post, paraphrases, target)
    nb_pre = [pre[(p, target, False)] for p in neighbors]
    nb_post = [post[(p, target, False)] for p in neighbors]
    rw = float(score(r_pre, r_post))
    ps = M.paraphrase_score(pp_pre, pp_post, erase=prob.erase) if paraphrases else math.nan
    ps1 = M.paraphrase_score(pp_pre, pp_post, erase=prob.erase, first_only=True) if paraphrases else math.nan
    ns = M.neighborhood_score(nb_pre, nb_post) if neighbors else math.nan
    ns1 = M.neighborhood_score(nb_pre, nb_post, first_only=True) if neighbors else math.nan

    nan = math.nan
    if new is not None and old is not None:
        es = float(M.success(post[(rewrite, new, noised)], post[(rewrite, old, noised)]))
        em = float(M.magnitude(post[(rewrite, new, noised)], post[(rewrite, old, noised)]))
        pas = _mean(M.success(post[(p, new, noised)], post[(p, old, noised)]) for p in paraphrases) if paraphrases else nan
        pam = _mean(M.magnitude(post[(p, new, noised)], post[(p, old, noised)]) for p in paraphrases) if paraphrases else nan
    else:
        es = em = pas = pam = nan
    if n_other is not None and neighbors:
        nbs = _mean(M.success(post[(p, tt, False)], post[(p, n_other, False)]) for p, tt in zip(neighbors, n_true))
        nbm = _mean(M.magnitude(post[(p, tt, False)], post[(p, n_other, False)]) for p, tt in zip(neighbors, n_true))
    else:
        nbs = nbm = nan

    return EditOutcome(
        fact_id=fact.id,
        problem=problem,
        method=method,
        layer=int(layer),
        layers=tuple(layers),
        token=str(recorded_token),
        token_index=token_index,
        target=target,
        objective=prob.objective,
        rewrite_score=rw,
        paraphrase_score=ps,
        neighborhood_score=ns,
        overall_score=M.overall_score(rw, ps, ns),
        overall_hmean=M.harmonic_mean(rw, ps, ns),
        essence_score=float(M.essence_score(ppl_pre, ppl_post)) if texts is not None else nan,
        paraphrase_score_first=ps1,
        neighborhood_score_first=ns1,
        p_rewrite_pre=r_pre,
        p_rewrite_post=r_post,
        p_paraphrase_pre=_mean(pp_pre),
        p_paraphrase_post=_mean(pp_post),
        p_neighborhood_pre=_mean(nb_pre),
        p_neighborhood_post=_mean(nb_post),
        ppl_pre=ppl_pre,
        ppl_post=ppl_post,
        efficacy_success=es,
        efficacy_magnitude=em,
        paraphrase_success=pas,
        paraphrase_magnitude=pam,
        neighborhood_success=nbs,
        neighborhood_magnitude=nbm,
        meng_score=M.harmonic_mean(es, pas, nbs),
        n_paraphrases=len(paraphrases),
        n_neighborhood=len(neighbors),
        update_norm=update_norm,
        fluency_pre=fluency_pre,
        fluency_post=fluency_post,
        edit_seconds=edit_seconds,
        seconds=time.perf_counter() - t0,
        **_convergence_columns(result.convergence),
        rewrite_score_heldout_noise=float(score(p_heldout_pre, p_heldout_post)) if held is not None else nan,
    )


def _convergence_columns(c) -> dict:
    if c is None:
        return {}
    return {"opt_final_loss": float(c.final_loss), "opt_steps": int(c.steps), "opt_p_target": float(c.p_target),
            "opt_delta_ratio": float(c.delta_ratio), "opt_clamped": float(c.clamped),
            "opt_bound_share": float(c.bound_share)}
