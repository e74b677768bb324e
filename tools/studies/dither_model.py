"""Move a model dequantized from a GGUF off its quantization grid: add uniform noise of one grid cell.

    .venv/bin/python -m tools.studies.dither_model SRC_HF_DIR DST_HF_DIR [--group 16] [--seed 0]

Every real model here comes out of a quantized GGUF (../shared/README.md), so its matrices sit exactly on a
K-quant grid and re-quantizing to that same format is nearly lossless: a type comparison on such weights favours
whichever format the file was shipped in. The shipped weights are round(w_orig / step) * step, i.e. w_orig lies
within half a step of them; adding U(-step/2, step/2) gives a continuous model distributed like an original that
quantizes back to roughly the same grid. The step is read off the weights themselves: in each group of `--group`
consecutive weights of a row (K-quant sub-blocks are 16 or 32 wide) the smallest gap between distinct values.
Only 2-D weight matrices are dithered; norms, biases and 1-D tensors are copied. Deterministic for a seed.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def grid_step(w: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group smallest positive gap between sorted values (0 where a group has one distinct value)."""
    g = w.reshape(-1, group).sort(dim=1).values
    gaps = g.diff(dim=1)
    gaps = torch.where(gaps > 0, gaps, torch.full_like(gaps, float("inf")))
    step = gaps.min(dim=1).values
    return torch.where(torch.isfinite(step), step, torch.zeros_like(step))


def dither(w: torch.Tensor, group: int, gen: torch.Generator) -> torch.Tensor:
    x = w.float()
    if x.dim() != 2 or x.shape[1] % group:
        return w
    step = grid_step(x, group).unsqueeze(1)
    noise = (torch.rand(x.reshape(-1, group).shape, generator=gen) - 0.5) * step
    return (x.reshape(-1, group) + noise).reshape(x.shape).to(w.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(a.seed)
    tmp = a.dst.with_name(a.dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in a.src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp / f.name)
    for f in sorted(a.src.glob("*.safetensors")):
        tensors = load_file(f)
        out = {}
        for name in sorted(tensors):
            t = tensors[name]
            out[name] = dither(t, a.group, gen) if name.endswith("weight") and t.dim() == 2 else t
            if out[name] is not t:
                rel = ((out[name].float() - t.float()).norm() / t.float().norm()).item()
                print(f"{name}: dithered, relative change {rel:.2e}", flush=True)
        save_file(out, tmp / f.name, metadata={"format": "pt"})
    shutil.rmtree(a.dst, ignore_errors=True)
    tmp.rename(a.dst)
    print(a.dst)


if __name__ == "__main__":
    main()
