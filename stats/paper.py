"""The paper's own numbers (Hase et al. 2023; GPT-J 6B on CounterFact), in one place, for side-by-side tables.

Sources (``../shared/papers/``): Table 3 (rewrite-score R² of ``score ~ C(layer)``, ``score ~ trace``,
``score ~ C(layer) * trace``, their difference and the F-test p of Both vs Layer; App. C), Table 2 (ROME under
Error Injection on the concentrated-effects subset, 74 of 652 facts; App. B), Table 7 (in-sample RMSE / MAE of the
Layer and Trace models for ROME's rewrite score) and Fig. 4 (Pearson ρ of rewrite score vs tracing effect for ROME
at GPT-J's layer 6 of 28). Fig. 7 (mean rewrite / paraphrase / neighborhood score by edit layer) is a plot without
printed numbers, so only its description is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PaperR2", "PAPER_TABLE3", "PAPER_TABLE2_ROME", "PAPER_TABLE2_N_FACTS", "PAPER_TABLE7_ROME", "PAPER_FIG4", "PAPER_MODEL",
           "PAPER_N_FACTS", "PAPER_FIG7"]

PAPER_MODEL = "GPT-J 6B (28 layers)"
PAPER_N_FACTS = 652  # facts with tracing and edits (App. B: 74 of them concentrated)


@dataclass(frozen=True)
class PaperR2:
    """One row of the paper's R² tables: Layer / Trace / Both, Diff (Both − Layer) and the F-test p as printed
    (``None`` where the paper prints none)."""

    layer: float
    trace: float
    both: float
    diff: float | None = None
    p: str | None = None


#: Table 3 (rewrite score), keyed by its printed row labels (Editing Problem, Method), which are the registries'
#: labels (``stats.tables.PROBLEM_LABELS`` / ``METHOD_LABELS``).
PAPER_TABLE3: dict[tuple[str, str], PaperR2] = {
    ("Error Injection", "FT (1 layer)"): PaperR2(0.756, 0.062, 0.758, 0.002, "<1e-4"),
    ("Error Injection", "FT (5 layers)"): PaperR2(0.775, 0.055, 0.777, 0.002, "<1e-4"),
    ("Error Injection", "ROME (1 layer)"): PaperR2(0.947, 0.016, 0.948, 0.001, "<1e-4"),
    ("Error Injection", "MEMIT (5 layers)"): PaperR2(0.677, 0.024, 0.678, 0.001, "0.199"),
    ("Tracing Reversal", "FT (1 layer)"): PaperR2(0.067, 0.0, 0.067, 0.0, "0.997"),
    ("Tracing Reversal", "FT (5 layers)"): PaperR2(0.751, 0.045, 0.752, 0.001, "0.032"),
    ("Tracing Reversal", "ROME (1 layer)"): PaperR2(0.294, 0.017, 0.31, 0.015, "<1e-4"),
    ("Tracing Reversal", "MEMIT (5 layers)"): PaperR2(0.212, 0.036, 0.218, 0.006, "<1e-4"),
    ("Fact Erasure", "FT (1 layer)"): PaperR2(0.643, 0.028, 0.646, 0.003, "<1e-4"),
    ("Fact Erasure", "FT (5 layers)"): PaperR2(0.698, 0.025, 0.70, 0.002, "<1e-4"),
    ("Fact Erasure", "ROME (1 layer)"): PaperR2(0.857, 0.019, 0.858, 0.0, "0.555"),
    ("Fact Erasure", "MEMIT (5 layers)"): PaperR2(0.925, 0.019, 0.925, 0.0, "0.669"),
    ("Fact Amplification", "FT (1 layer)"): PaperR2(0.383, 0.014, 0.393, 0.01, "<1e-4"),
    ("Fact Amplification", "FT (5 layers)"): PaperR2(0.424, 0.01, 0.436, 0.011, "<1e-4"),
    ("Fact Amplification", "ROME (1 layer)"): PaperR2(0.88, 0.02, 0.88, 0.0, "0.654"),
    ("Fact Amplification", "MEMIT (5 layers)"): PaperR2(0.905, 0.018, 0.906, 0.001, "<1e-4"),
    ("Fact Forcing", "FT (1 layer)"): PaperR2(0.697, 0.104, 0.724, 0.027, "<1e-4"),
    ("Fact Forcing", "FT (5 layers)"): PaperR2(0.634, 0.10, 0.666, 0.032, "<1e-4"),
    ("Fact Forcing", "ROME (1 layer)"): PaperR2(0.422, 0.004, 0.425, 0.003, "<1e-4"),
    ("Fact Forcing", "MEMIT (5 layers)"): PaperR2(0.345, 0.041, 0.354, 0.009, "<1e-4"),
}

#: Table 2: ROME, Error Injection, the concentrated-effects subset (74 of 652 facts).
PAPER_TABLE2_ROME = PaperR2(0.927, 0.02, 0.929, 0.002)
PAPER_TABLE2_N_FACTS = 74

#: Table 7: ROME rewrite score, in-sample RMSE and MAE of the Layer and the Trace model.
PAPER_TABLE7_ROME = {"rmse_layer": 0.073, "rmse_trace": 0.315, "mae_layer": 0.02, "mae_trace": 0.206}

#: Fig. 4: Pearson ρ of ROME's rewrite score vs the tracing effect at GPT-J's default edit layer.
PAPER_FIG4 = {"layer": 6, "rho": -0.13}

#: Fig. 7 has no printed numbers; what the paper says of it (§4.2, App. B).
PAPER_FIG7 = ("ROME under Error Injection works well at early-to-middle layers (the paper asks why layer 6 works "
              "well in the first place); the plot is not printed as numbers, so only its shape can be compared.")
