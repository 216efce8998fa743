"""The architecture-family × check matrix (issue 14): for each tiny random family model (the fixtures of
tests/test_families.py) the largest difference of every fast path from its slow path, and the ROME checks.

    .venv/bin/python scripts/family_matrix.py      # prints a Markdown table (~1 min on 2 cores)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ["LOCEDIT_CACHE"] = tempfile.mkdtemp(prefix="family-matrix-")  # the tiny models' templates stay out

from test_families import BASE, FAMILIES  # noqa: E402  (the same configs as the tests)

from locedit.editors import EditRequest, apply, default_hparams, restore  # noqa: E402
from locedit.editors.requests import UnsupportedArchitectureError  # noqa: E402
from locedit.tracer import target_probs, trace, zero  # noqa: E402
from locedit.tracer.lean import lean_supported  # noqa: E402
from locedit.tracer.models import PACKAGED_MODELS  # noqa: E402

P, S, O = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " French"
REQ = EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")
EYE = lambda model, layer: torch.eye(model.cfg.d_mlp, dtype=torch.float64)  # noqa: E731


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    g = PACKAGED_MODELS["smollm2-135m"].gguf_path()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    cols = ["backend", "trace noise (mlp/attn/resid)", "trace flip (mlp/attn/resid)", "zeroing (mlp/attn/resid)",
            "ROME fast vs plain", "r-ROME", "MEMIT", "FT-1", "ROME p(target) before → after", "restore bit-exact"]
    print("| family | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, extra in FAMILIES.items():
        cfg = HookedTransformerConfig(**BASE, **extra, d_vocab=len(tok), model_name=f"tiny-{name}")
        torch.manual_seed(0)
        m = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right").eval()
        row = ["lean" if lean_supported(m) else "TransformerLens"]
        for corruption in ({"noise": 3.0, "samples": 3}, {"corrupt": "flip", "flip_subject": "Barack Obama"}):
            row.append(" / ".join(f"{rel(trace(m, P, S, O, kind=k, **corruption).grid, trace(m, P, S, O, kind=k, algorithm='naive', **corruption).grid):.1e}"
                                  for k in ("mlp", "attn", "resid")))
        row.append(" / ".join(f"{rel(zero(m, P, S, O, kind=k, window=1 if k == 'resid' else 3, per_token=True).grid, zero(m, P, S, O, kind=k, window=1 if k == 'resid' else 3, per_token=True, algorithm='naive').grid):.1e}"
                              for k in ("mlp", "attn", "resid")))
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        for method, layers in (("rome", [1]), ("r-rome", [1]), ("memit", [0, 1]), ("ft-1", [1])):
            hp = default_hparams(method, m)
            change = {"num_steps": 5, "norm_constraint": 1e-2} if method.startswith("ft") else \
                {"v_num_grad_steps": 5, "context_lengths": ((3, 2),)}
            hp = type(hp)(**{**hp.__dict__, **change})
            try:
                fast = apply(m, REQ, method, layers, hparams=hp, covariance=EYE, fast=True)
            except UnsupportedArchitectureError:
                row.append("refused (post-norm)")
                continue
            restore(m, fast)
            plain = apply(m, REQ, method, layers, hparams=hp, covariance=EYE, fast=False)
            restore(m, plain)
            row.append(f"{max(float((fast.deltas[n] - plain.deltas[n]).norm() / plain.deltas[n].norm()) for n in fast.deltas):.1e}")
        hp = default_hparams("rome", m)
        hp = type(hp)(**{**hp.__dict__, "v_num_grad_steps": 20, "context_lengths": (), "clamp_norm_factor": 1e6,
                         "v_weight_decay": 0.0, "kl_factor": 0.0})
        p0 = float(target_probs(m, [REQ.text], [REQ.target])[0])
        res = apply(m, REQ, "rome", [1], hparams=hp, covariance=EYE)
        p1 = float(target_probs(m, [REQ.text], [REQ.target])[0])
        restore(m, res)
        row.append(f"{p0:.2e} → {p1:.2e} (×{p1 / p0:.2f})")
        row.append("yes" if all(torch.equal(p, before[n]) for n, p in m.named_parameters()) else "NO")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
