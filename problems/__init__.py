"""locedit.problems: datasets (CounterFact, zsRE, known_1000), the five editing problems of Hase et al. 2023, the
correctness filters and the edit-success metrics.

    from locedit.problems import load_counterfact, run_edit, PROBLEMS
    facts = load_counterfact()
    outcome = run_edit(model, facts[0], problem, "rome", layer=6)    # problem: any name in PROBLEMS
"""

from locedit.problems.facts import (
    DATASETS,
    Fact,
    MalformedRecordWarning,
    SkippedRecord,
    essence_prompt,
    load_counterfact,
    load_dataset,
    load_known,
    load_zsre,
)
from locedit.problems.filters import filter_known, filter_min_target_prob, known_mask, min_target_prob_mask
from locedit.problems.run import EditOutcome, run_edit
from locedit.problems.variants import (
    PROBLEM_NAMES,
    PROBLEMS,
    MissingTargetError,
    Problem,
    ProblemName,
    noised_prediction,
    problem_hparams,
    resolve_problem,
)

__all__ = [
    "DATASETS",
    "EditOutcome",
    "Fact",
    "MalformedRecordWarning",
    "MissingTargetError",
    "PROBLEMS",
    "PROBLEM_NAMES",
    "Problem",
    "ProblemName",
    "SkippedRecord",
    "essence_prompt",
    "filter_known",
    "filter_min_target_prob",
    "known_mask",
    "load_counterfact",
    "load_dataset",
    "load_known",
    "load_zsre",
    "min_target_prob_mask",
    "noised_prediction",
    "problem_hparams",
    "resolve_problem",
    "run_edit",
]
