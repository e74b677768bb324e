"""How far a format's rounding can move the weights, next to how far the fine-tune moved them.

Realignment only chooses among a format's codes, so its reach in weight space is about one code step per weight.
This prints, for a few layers' q/v/down projections, RMS(fine-tuned - aligned) divided by the RMS error of plain
round-to-nearest in each format (Q4_K, or its shape fallback Q5_0 where the row length does not allow it), and the
ratio of the two formats' errors (= ratio of their code steps):

    .venv/bin/python -m tools.studies.grid_reach --aligned $T/aligned-offgrid --finetuned $T/finetuned
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from qrealign_gguf.formats import codec
from qrealign_gguf.plan import shape_fallback


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def rtn_error(w: np.ndarray, qtype: str) -> float:
    return rms(codec.dequantize(codec.quantize(w, qtype), qtype, w.shape[1]) - w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--aligned", type=Path, required=True)
    ap.add_argument("--finetuned", type=Path, required=True)
    ap.add_argument("--layers", type=int, nargs="*", default=[0, 6, 12, 18, 23])
    ap.add_argument("--modules", nargs="*", default=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])
    a = ap.parse_args()
    al = load_file(a.aligned / "model.safetensors")
    ft = load_file(a.finetuned / "model.safetensors")
    print("layer module              low    delta/err(Q8_0)  delta/err(low)  err(low)/err(Q8_0)")
    for layer in a.layers:
        for m in a.modules:
            k = f"model.layers.{layer}.{m}.weight"
            w = ft[k].astype(np.float32)
            delta = rms(w - al[k].astype(np.float32))
            low = shape_fallback("Q4_K", w.shape[1])
            e8, elow = rtn_error(w, "Q8_0"), rtn_error(w, low)
            print(f"{layer:5d} {m:19s} {low:6s} {delta / e8:15.2f} {delta / elow:15.2f} {elow / e8:19.1f}")


if __name__ == "__main__":
    main()
