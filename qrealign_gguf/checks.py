"""Range checks of the plain numbers a job is given, before anything is loaded: a typo must not cost a model
load, nor reach the output as NaN. The messages name the CLI options (the names the README documents)."""
from __future__ import annotations

import math

from .errors import InputError

# rule -> (is the value bad?, what it must be)
_RULES = {
    ">0": (lambda v: v <= 0, "greater than 0"),
    ">=0": (lambda v: v < 0, "0 or more"),
    "finite": (lambda v: False, "finite"),
    "0..1": (lambda v: not 0 <= v <= 1, "between 0 and 1"),
}


def check_numbers(**checks: tuple[float | int | None, str]) -> None:
    """Each option name -> (value, rule), rule one of: '>0', '>=0', 'finite', '0..1'. None (not given) passes."""
    for name, (value, rule) in checks.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{name} {value} is not a finite number")
        bad, want = _RULES[rule]
        if bad(value):
            raise InputError(f"{name} {value} is out of range: it must be {want}")
