"""locedit.problems: datasets (CounterFact, zsRE, known_1000), the five editing problems of Hase et al. 2023, the
correctness filters and the edit-success metrics.

    from problems import load_counterfact, run_edit, PROBLEMS
    facts = load_counterfact()
    outcome = run_edit(model, facts[0], "error_injection", "rome", layer=6)
"""

from problems.facts import (
    Fact,
    MalformedRecordWarning,
    SkippedRecord,
    essence_prompt,
    load_counterfact,
    load_known,
    load_zsre,
)
from problems.filters import filter_known, filter_min_target_prob, known_mask, min_target_prob_mask
from problems.run import EditOutcome, edit_layers, run_edit
from problems.variants import (
    PROBLEM_NAMES,
    PROBLEMS,
    STUDY_METHODS,
    MissingTargetError,
    Problem,
    noised_prediction,
    problem_hparams,
)

__all__ = [
    "EditOutcome",
    "Fact",
    "MalformedRecordWarning",
    "MissingTargetError",
    "PROBLEMS",
    "PROBLEM_NAMES",
    "Problem",
    "STUDY_METHODS",
    "SkippedRecord",
    "edit_layers",
    "essence_prompt",
    "filter_known",
    "filter_min_target_prob",
    "known_mask",
    "load_counterfact",
    "load_known",
    "load_zsre",
    "min_target_prob_mask",
    "noised_prediction",
    "problem_hparams",
    "run_edit",
]
