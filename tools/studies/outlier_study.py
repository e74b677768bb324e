"""Where do per-block fp16 outliers pay for their bits? Weight error of K-quants with and without them.

    .venv/bin/python -m tools.studies.outlier_study HF_DIR [--imatrix FILE.gguf] [--layers 0,7,14,21] [--rows 256]

QR4_KO spends 0.375 bpw on 4 fp16 outliers per 256 weights on top of Q4_K. This asks the design question for any
"K-quant + outliers" type before anyone writes its kernels: for Q3_K / Q4_K / Q5_K bases, how much importance-
weighted weight error do the 4 outliers remove, compared with spending the bits on the next K-quant instead?
The "+O" variants are emulated with the real codec exactly as QR4_KO's encoder does it (native/blocks_custom.h):
the 4 largest x^2 * im of each 256-block are taken out (replaced by their 32-sub-block's mean, importance 0),
the block is quantized, the outliers are written back as fp16. The Q4_K+O column is checked against the real
QR4_KO codec (printed). Error: sum(im * (w - w_hat)^2) / sum(im * w^2) over sampled rows of each layer matrix;
the log2 error per bit is the slope to compare: uniform bits buy ~2 (4x less error per extra bit).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from qrealign_gguf.formats import codec
from qrealign_gguf.formats.types import qtype
from qrealign_gguf.imatrix import load_imatrix

N_OUT, QK = 4, 256
BASES = ("Q3_K", "Q4_K", "Q5_K", "Q6_K")
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # 32-weight blocks: what K-quants fall back to


def with_outliers(x: np.ndarray, im: np.ndarray, base: str) -> np.ndarray:
    """Dequantized rows of `base` + 4 fp16 outliers per 256 (QR4_KO's recipe with any K base)."""
    rows, cols = x.shape
    xb = x.reshape(rows, cols // QK, QK)
    imp = (xb * xb) * im.reshape(1, cols // QK, QK)
    idx = np.argsort(-imp, axis=2, kind="stable")[:, :, :N_OUT]
    mask = np.zeros_like(xb, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=2)
    sub = xb.reshape(rows, cols // 32, 32)
    msub = mask.reshape(rows, cols // 32, 32)
    mean = np.where(msub, 0, sub).sum(2, keepdims=True) / np.maximum((~msub).sum(2, keepdims=True), 1)
    xr = np.where(msub, mean, sub).reshape(rows, cols).astype(np.float32)
    out = np.empty_like(x)
    for r in range(rows):  # per-row importance: the outliers get 0
        w = np.where(mask[r].reshape(cols), 0.0, im).astype(np.float32)
        out[r] = codec.dequantize(codec.quantize(xr[r:r + 1], base, w), base, cols)[0]
    o16 = x.astype(np.float16).astype(np.float32)
    return np.where(mask.reshape(rows, cols), o16, out)


def finer_scales(x: np.ndarray, im: np.ndarray, base: str) -> np.ndarray:
    """Dequantized rows of a `base` K-quant whose 32-wide sub-blocks hold only 16 weights: each 16-weight half is
    written twice, so a 256 super-block covers 128 real weights with 8 scale/min pairs of 16 (2x the scale bits
    and 2x the fp16 d/dmin per weight; e.g. Q4_K -> 5.0 bpw, and 128 divides rows Q4_K's 256 does not)."""
    rows, cols = x.shape
    h = x.reshape(rows, cols // 16, 1, 16)
    xp = np.ascontiguousarray(np.concatenate([h, h], axis=2).reshape(rows, 2 * cols))
    imp = np.ascontiguousarray(np.repeat(im.reshape(cols // 16, 1, 16), 2, axis=1).reshape(2 * cols))
    d = codec.dequantize(codec.quantize(xp, base, imp), base, 2 * cols)
    return d.reshape(rows, cols // 16, 2, 16)[:, :, 0, :].reshape(rows, cols)


def small_superblock(x: np.ndarray, im: np.ndarray, base: str) -> np.ndarray:
    """Dequantized rows of a `base` K-quant with 128-weight super-blocks: each 128 group padded with 128 zeros of
    importance 0 (their sub-blocks get scale 0 and do not move d), so the real half sets every scale."""
    rows, cols = x.shape
    xp = np.concatenate([x.reshape(rows, cols // 128, 128), np.zeros((rows, cols // 128, 128), np.float32)], axis=2)
    imp = np.concatenate([im.reshape(cols // 128, 128), np.zeros((cols // 128, 128), np.float32)], axis=1)
    xp, imp = np.ascontiguousarray(xp.reshape(rows, 2 * cols)), np.ascontiguousarray(imp.reshape(2 * cols))
    d = codec.dequantize(codec.quantize(xp, base, imp), base, 2 * cols)
    return d.reshape(rows, cols // 128, 256)[:, :, :128].reshape(rows, cols)


def decode(w: np.ndarray, im: np.ndarray, design: str) -> np.ndarray:
    """Decoded rows of a design name: a codec type, or BASE+O / Q4_K/16 / BASE/128 (the emulations above)."""
    if design.endswith("/128"):
        return small_superblock(w, im, design[:-4])
    if design.endswith("/16"):
        return finer_scales(w, im, design[:-3])
    if design.endswith("+O"):
        return with_outliers(w, im, design[:-2])
    return codec.dequantize(codec.quantize(w, design, im), design, w.shape[1])


def rel_err(w: np.ndarray, w_hat: np.ndarray, im: np.ndarray) -> float:
    return float(((w - w_hat) ** 2 * im).sum() / ((w * w) * im).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--layers", default="0,7,14,21")
    ap.add_argument("--rows", type=int, default=256)
    a = ap.parse_args()
    from safetensors import safe_open  # noqa: PLC0415

    imx = load_imatrix(a.imatrix) if a.imatrix else {}
    rng = np.random.default_rng(0)
    tot: dict[str, list[float]] = {}
    layers = [int(x) for x in a.layers.split(",")]
    for f in sorted(a.model.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in sorted(st.keys()):
                parts = name.split(".")
                if len(parts) < 4 or parts[1] != "layers" or int(parts[2]) not in layers or not name.endswith("proj.weight"):
                    continue
                w = st.get_tensor(name).float().numpy()
                if w.shape[1] % 128:
                    continue
                w = np.ascontiguousarray(w[rng.choice(w.shape[0], min(a.rows, w.shape[0]), replace=False)])
                im = _imatrix_for(imx, name, w.shape[1])
                designs = [*LEGACY, *(b + "/128" for b in BASES[1:])]
                if w.shape[1] % QK == 0:  # the 256-block types
                    designs += [*BASES, *(b + "+O" for b in BASES[:3]), "Q4_K/16", "QR4_KO"]
                errs = {d: rel_err(w, decode(w, im, d), im) for d in designs}
                print(name, " ".join(f"{k} {v:.3e}" for k, v in errs.items()), flush=True)
                for k, v in errs.items():
                    tot.setdefault(k, []).append(v)
    print(f"\nmean over the matrices that can hold each type ({a.rows} sampled rows each; n = how many), "
          "importance-weighted relative squared error:")
    mean = {k: float(np.mean(v)) for k, v in tot.items()}
    bpw = {b: qtype(b).bits_per_weight for b in BASES}
    extra = qtype("QR4_KO").bits_per_weight - qtype("Q4_K").bits_per_weight
    bits = {**bpw, **{b + "+O": bpw[b] + extra for b in BASES[:3]}, "QR4_KO": bpw["Q4_K"] + extra,
            "Q4_K/16": 2 * bpw["Q4_K"] - 4,  # 4-bit codes as before, the 0.5 bpw of scales doubled
            # 128 super-blocks: the per-super-block fp16 d (and dmin) cost twice as much per weight
            "Q4_K/128": 4.625, "Q5_K/128": 5.625, "Q6_K/128": 6.625,
            **{b: qtype(b).bits_per_weight for b in LEGACY}}
    for k, v in sorted(mean.items(), key=lambda kv: bits[kv[0]]):
        line = f"{k:8} {bits[k]:6.3f} bpw  err {v:.3e}  (n {len(tot[k])})"
        b = k.split("+")[0].split("/")[0]
        if k != b and k != "QR4_KO" and b in mean and len(tot[b]) == len(tot[k]):
            gain = np.log2(mean[b] / v)
            dbits = bits[k] - bpw[b]
            line += f"   vs {b}: log2 gain {gain:.2f} for {dbits:.3f} bpw = {gain / dbits:.2f} per bit"
        print(line)
    for lo, hi in zip(BASES, BASES[1:]):
        if lo not in mean or hi not in mean:
            continue
        g = np.log2(mean[lo] / mean[hi]) / (bpw[hi] - bpw[lo])
        print(f"{lo} -> {hi}: {g:.2f} log2 gain per bit")


def _imatrix_for(imx: dict[str, np.ndarray], hf_name: str, cols: int) -> np.ndarray:
    """The llama.cpp imatrix entry of an HF qwen2/llama matrix name (ones without one)."""
    parts = hf_name.split(".")
    gg = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
          "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[parts[4]]
    v = imx.get(f"blk.{parts[2]}.{gg}.weight")
    return np.ascontiguousarray(v, dtype=np.float32) if v is not None and v.size == cols else np.ones(cols, np.float32)


if __name__ == "__main__":
    main()
