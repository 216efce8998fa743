"""One comparison of two edit-outcome rows (``EditOutcome.as_row()``), used wherever a fast path must equal a slow one."""

import pytest


def assert_rows_equal(got: dict, want: dict, *, rel: float, abs_: float, context=()) -> None:
    """Every column of ``want`` equals ``got``'s: floats within ``rel``/``abs_`` (NaN equals NaN), everything else
    exactly; timings (``*seconds``) are skipped. ``context`` is shown on a failure."""
    for k, v in want.items():
        if k.endswith("seconds"):
            continue
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, rel=rel, abs=abs_, nan_ok=True), (*context, k, got[k], v)
        else:
            assert got[k] == v, (*context, k)
