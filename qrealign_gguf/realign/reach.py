"""Which output types leave realignment room to act, and the caveat `convert` shows for those that do not.

Realignment only chooses among a format's codes (each weight keeps its code or takes the neighbour) and nudges the
per-block scales, so what it can change is bounded by the code step. At 4-5 bits the step is large next to the
fine-tune's weight change and rounding alone can encode a shift back toward refusal; at 8 bits it is not. Measured
on the 0.5B testbed (docs/BENCHMARKS.md, "Realigned Q8_0"; `python -m tools.studies.q8_reach`): every weight moved
to its other neighbour changes the layer by 2.05x the fine-tune's change at 8 bits, 37x in 4-bit blocks; and the
realigned Q8_0 file refused 7.3 % of the dev prompts (RTN Q8_0 0 %, realigned Q4_K_M 58.5 %, aligned 51.2 %).
Only Q8_0 is listed: it is the 8-bit type that was measured (Q6_K was not).
"""
from __future__ import annotations

import math

from ..plan import Plan

LOW_REACH = ("Q8_0",)
WARN_SHARE = 0.5  # caveat when at least this share of the quantized weights is in a LOW_REACH type


def low_reach_share(plan: Plan) -> float:
    """Share of the weights realignment learns (the decoder layers' quantized matrices; embeddings and the output
    head are encoded plainly) that are stored in a LOW_REACH type."""
    total = low = 0
    for p in plan.tensors:
        if not p.qtype.native or not p.source.name.startswith("blk."):  # F32/F16/BF16 casts round nothing
            continue
        n = math.prod(p.source.shape)
        total += n
        low += n if p.qtype.name in LOW_REACH else 0
    return low / total if total else 0.0


def reach_caveat(plan: Plan) -> str | None:
    """One paragraph for the user when a realigning conversion's type leaves rounding too little room, else None."""
    share = low_reach_share(plan)
    if share < WARN_SHARE:
        return None
    return (f"{share:.0%} of the weights realignment learns will be {'/'.join(LOW_REACH)}: at 8 bits a code step is small "
            f"next to the fine-tune's change, so rounding can hardly move the model back (testbed: realigned Q8_0 "
            f"refused 7.3 % of harmful prompts, realigned Q4_K_M 58.5 %, the aligned model 51.2 %). The file will be "
            f"close to a plain Q8_0; for the repair choose Q4_K_M or Q5_K_M (docs/BENCHMARKS.md).")
