"""Checks for the notebooks' exercises whose answer is a number.

    answer = None            # the learner writes a number here
    check(answer, expected)  # prints whether it is right; never raises, never blocks

The expected value is computed in the cell from the library (so it follows the model the
notebook runs on), and is not printed unless the answer is close: the hint above the cell says
how to find it.
"""
from __future__ import annotations


def check(answer, expected: float, *, rel: float = 0.02, abs_tol: float = 1e-9, name: str = "answer") -> bool | None:
    """True when ``answer`` is within ``rel`` (relative) of ``expected``; None while unanswered."""
    if answer is None:
        print(f"{name}: not answered yet (write a number above and run this cell again)")
        return None
    try:
        value = float(answer)
    except (TypeError, ValueError):
        print(f"{name}: {answer!r} is not a number")
        return False
    ok = abs(value - expected) <= max(rel * abs(expected), abs_tol)
    if ok:
        print(f"{name}: {value:g} is right (the library says {expected:.4g})")
    else:
        side = "high" if value > expected else "low"
        print(f"{name}: {value:g} is too {side}; open the hint above and try again")
    return ok
