"""Why realigned Q8_0 cannot restore refusal: how much of the fine-tune's change rounding alone can undo, per bit width.

    .venv/bin/python -m tools.studies.q8_reach --aligned A_DIR --finetuned F_DIR [--json out/q8_reach.json]

For every decoder-layer matrix, delta = aligned - finetuned. Realignment encodes the FINE-TUNED weights and may,
at fixed block scales, give each weight either neighbour of its unrounded level (simulate.V_RANGE = 0.5: keep the
code or take the next one toward v). The best it can then do toward the aligned weights is, per weight, the
reachable level nearest to the aligned value. Reported per format (symmetric blocks of 32, step = absmax/127 for
8 bits and absmax/7 for 4 bits, the grids of Q8_0 and of a 4-bit block):
  |delta| / step     the fine-tune's change in units of the format's step (median, and the share above 1 step)
  capacity           ||other neighbour - RTN(finetuned)|| / ||delta||: the largest change rounding choices can make
                     (every weight to its other neighbour), in units of the fine-tune's change. Realignment needs
                     room to move the layer's outputs back along the refusal direction: far below 1, it has none
  recovered          1 - ||aligned - best reachable|| / ||aligned - RTN(finetuned)||: the part of the distance to
                     the aligned weights that rounding choices can remove (0 = nothing, 1 = all; at 4 bits the
                     denominator is mostly quantization noise, so this is small there for another reason)
A format whose step is small next to the fine-tune's change leaves rounding no room to move toward the aligned
model: the reachable set is a thin shell around the fine-tuned weights.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

STEPS = {"Q8_0 (8-bit)": 127.0, "4-bit block": 7.0}


def reach(aligned: np.ndarray, finetuned: np.ndarray, levels: float) -> dict[str, float]:
    """Per-format statistics of one matrix (rows split into blocks of 32)."""
    a = aligned.reshape(-1, 32).astype(np.float64)
    f = finetuned.reshape(-1, 32).astype(np.float64)
    step = np.abs(f).max(1, keepdims=True) / levels
    step[step == 0] = 1.0
    p = f / step  # unrounded level of the fine-tuned weight
    rtn = np.round(p) * step
    lo, hi = np.floor(p), np.ceil(p)  # the two codes realignment may choose between
    target = a / step
    best = np.where(np.abs(lo - target) <= np.abs(hi - target), lo, hi) * step
    ratio = np.abs(a - f) / step
    d_rtn = np.linalg.norm(a - rtn)
    other = np.where(np.round(p) == lo, hi, lo) * step
    delta = np.linalg.norm(a - f)
    return {"median_delta_steps": float(np.median(ratio)), "share_over_1_step": float((ratio > 1).mean()),
            "capacity": float(np.linalg.norm(other - rtn) / delta) if delta > 0 else float("inf"),
            "recovered": float(1 - np.linalg.norm(a - best) / d_rtn) if d_rtn > 0 else 0.0}


def study(aligned_dir: Path, finetuned_dir: Path) -> dict[str, dict[str, float]]:
    from qrealign_gguf.hf_model import HFModel

    ma, mf = HFModel(aligned_dir), HFModel(finetuned_dir)
    names = [n for n in mf.tensor_names() if ".layers." in n and n.endswith("proj.weight")]
    out: dict[str, dict[str, list[float]]] = {k: {} for k in STEPS}
    weights = []
    for n in names:
        fa, ff = ma.load(n), mf.load(n)
        weights.append(ff.size)
        for k, levels in STEPS.items():
            for stat, v in reach(fa, ff, levels).items():
                out[k].setdefault(stat, []).append(v)
    w = np.array(weights, dtype=np.float64)
    return {k: {stat: float(np.average(v, weights=w)) for stat, v in s.items()} for k, s in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--aligned", type=Path, required=True)
    ap.add_argument("--finetuned", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = study(a.aligned, a.finetuned)
    print("| format | median abs(delta) / step | share of weights with abs(delta) > 1 step | rounding capacity / "
          "fine-tune change | distance to aligned that rounding can remove |")
    print("|---|---:|---:|---:|---:|")
    for k, s in res.items():
        print(f"| {k} | {s['median_delta_steps']:.2f} | {s['share_over_1_step']:.1%} | {s['capacity']:.2f}x | "
              f"{s['recovered']:.1%} |")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
