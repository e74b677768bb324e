"""What the simulator costs per weight: the learnable state, what autograd keeps for backward, and the time of one
forward + backward of fake_quant, per type (one thread):

    .venv/bin/python -m tools.bench.fake_quant_cost [--rows 2048] [--cols 2048] [--types Q4_K IQ4_NL Q8_0]

To compare two versions of the code, run it from each tree with PYTHONPATH=<tree> (the venv's editable install
points at one checkout). Bytes are counted exactly (every tensor autograd saves, each storage once;
Learn's tensors), not read from RSS.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from qrealign_gguf.formats import simulate as sim


def _tensor_bytes(obj: object) -> int:
    """Bytes of the tensors directly in a dataclass (one level of nested dataclasses, e.g. Learn.start)."""
    total = 0
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif dataclasses.is_dataclass(v):
            total += _tensor_bytes(v)
    return total


def cost(qtype: str, rows: int, cols: int, repeats: int = 3) -> dict[str, float]:
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    L = sim.init_params(qtype, W)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sim.fake_quant(qtype, W, L)
    del y
    t0 = time.perf_counter()
    for _ in range(repeats):
        (sim.fake_quant(qtype, W, L) ** 2).sum().backward()
    dt = (time.perf_counter() - t0) / repeats
    n = W.numel()
    return {"state_B": _tensor_bytes(L) / n, "saved_B": sum(saved.values()) / n, "ns": dt * 1e9 / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q8_0", "Q4_0"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| type | learnable state (B/weight) | saved for backward (B/weight) | fwd+bwd (ns/weight) |")
    print("|---|---:|---:|---:|")
    for t in a.types:
        c = cost(t, a.rows, a.cols)
        print(f"| {t} | {c['state_B']:.1f} | {c['saved_B']:.1f} | {c['ns']:.0f} |")


if __name__ == "__main__":
    main()
