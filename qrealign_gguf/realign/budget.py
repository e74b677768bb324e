"""How much memory and time a realignment will take, before anything is loaded (`convert --dry-run` with
--aligned/--probes, and the check every realigning `convert` makes before its long work).

The layer-wise design (realign/pipeline.py) keeps, per rank:
  fixed       the process (python, torch, transformers) and the probes
  layer       one decoder layer's realignment working set: float32 weights, the simulator's start state, the
              learnables with their gradients, Adam's moments and the best-iterate snapshot, and what autograd
              keeps of fake_quant -- BYTES_PER_WEIGHT bytes per realigned weight, measured
              (tools/bench/realign_layer_memory.py, docs/BENCHMARKS.md)
  streams     this rank's activations of the current layer: the full-precision stream of the benign prompts
              (input and output) and the quantized-prefix stream of all prompts, float32 (on disk with
              --offload-dir: then only the batch being worked on is resident)
  batch       autograd's tensors of one optimizer step: both minibatches through the layer (attention scores
              and the MLP's intermediate activations dominate)
Time per layer = Adam steps x (fake_quant of every weight + forward/backward of both minibatches) + the passes over
all prompts (start/end evaluation, propagation, the full-precision stream), at the matmul and fake_quant rates
measured on the chosen device (measure_speed: a fraction of a second). Data parallel ranks divide the prompt work,
not the per-weight work: every rank runs fake_quant and Adam on the whole layer.

Pure functions of numbers (Geometry, Workload, Speed) -> Budget; the wiring (plan, prompts, device) is plan_budget.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

# Measured per realigned weight (tools/bench/realign_layer_memory.py, synthetic qwen2 layers, 2026-12-07): 46-53
# B/weight with simulate_grad's rounding Function, 61 on a small 256x1024 layer (112-154 before it); 64 leaves a
# margin. Re-measure with the benchmark whenever the simulator or realign_layer changes.
BYTES_PER_WEIGHT = 64
FIXED_BYTES = 700 << 20  # python + torch + transformers + tokenizer, measured RSS before any model tensor (0.5B run)
STEP_PASSES = 3  # forward + backward of a minibatch ~ 3 forward matmul passes
EVAL_PASSES = 4  # over all prompts per layer: start and end evaluation, propagation, the full-precision stream
GiB = 1 << 30


@dataclass(frozen=True)
class Geometry:
    """The largest decoder layer as the realignment sees it."""
    hidden: int
    intermediate: int
    heads: int
    n_layers: int
    layer_weights: int  # realigned matrix elements of the largest layer
    embedding_rows_bytes: int = 0  # the token embedding rows the prompts use (float32), layer 0's input


@dataclass(frozen=True)
class Workload:
    n_benign: int
    n_harmful: int
    mean_tokens: float  # per prompt, chat template included, after the max_tokens cut
    max_tokens: int
    batch: int
    iters: int
    ranks: int = 1
    offload: bool = False  # --offload-dir: streams on disk
    distill: bool = False  # --distill-weight: the aligned model's layer and its stream of the harmful prompts too


@dataclass(frozen=True)
class Speed:
    """Measured on the device that will run the work."""
    device: str
    matmul_flops: float  # float32 multiply-adds x2 per second
    fake_quant_s_per_weight: float  # forward + backward of the simulator, per weight


@dataclass(frozen=True)
class Budget:
    parts: dict[str, int]  # bytes per rank: fixed, layer, streams, batch
    seconds_per_layer: float
    n_layers: int

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_layer * self.n_layers


def estimate(g: Geometry, w: Workload, speed: Speed) -> Budget:
    share = 1.0 / max(1, w.ranks)  # a rank holds and runs its shard of the prompts
    f32 = 4
    tokens_all = (w.n_benign + w.n_harmful) * w.mean_tokens * share
    # fp stream: benign inputs and outputs; quantized-prefix stream: every prompt (in and out during propagation)
    stream_rows = (2 * w.n_benign * share + 2 * (w.n_benign + w.n_harmful) * share) * w.mean_tokens
    if w.distill:  # the aligned model's own states of the harmful prompts, in and out
        stream_rows += 2 * w.n_harmful * share * w.mean_tokens
    streams = int(stream_rows * g.hidden * f32)
    if w.offload:
        streams = int(2 * w.batch * w.max_tokens * g.hidden * f32 * 2)
    # one step: a benign and a harmful minibatch of max_tokens (padded), saved for backward: the MLP's gate/up/act
    # (3 x intermediate), attention's q/k/v/o and norms (~8 x hidden) and the scores (heads x T x T)
    rows = 2 * w.batch * w.max_tokens
    batch = int(rows * (3 * g.intermediate + 8 * g.hidden) * f32 + 2 * w.batch * g.heads * w.max_tokens ** 2 * f32)
    layer = g.layer_weights * (BYTES_PER_WEIGHT + (f32 if w.distill else 0))  # the aligned layer: plain float32
    parts = {"fixed": FIXED_BYTES + g.embedding_rows_bytes, "layer": layer,
             "streams": streams, "batch": batch}
    step_tokens = 2 * w.batch * w.mean_tokens * share  # each rank runs its part of the global minibatch
    matmul = 2.0 * g.layer_weights / speed.matmul_flops  # seconds per token through the layer, forward
    per_layer = (w.iters * (speed.fake_quant_s_per_weight * g.layer_weights + STEP_PASSES * matmul * step_tokens)
                 + EVAL_PASSES * matmul * tokens_all
                 + (matmul * w.n_harmful * share * w.mean_tokens if w.distill else 0.0))  # the aligned forward
    return Budget(parts, per_layer, g.n_layers)


def measure_speed(device: str = "cpu", n: int = 1 << 20) -> Speed:
    """Matmul rate and fake_quant cost per weight on `device`, from a short run (~0.2 s on a CPU core)."""
    import torch

    from ..formats import simulate
    from ..formats.types import qtype

    cols = 512
    w = torch.randn(n // cols, cols, device=device) * 0.02
    x = torch.randn(256, cols, device=device)

    def timed(fn, reps: int = 3) -> float:  # noqa: ANN001
        fn()  # warm-up: first calls allocate
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    mm = timed(lambda: x @ w.T)
    learn = simulate.init_params(qtype("Q4_K"), w)

    def fq() -> None:
        simulate.fake_quant(qtype("Q4_K"), w, learn).square().sum().backward()

    return Speed(device, 2.0 * x.shape[0] * w.numel() / mm, timed(fq, 2) / w.numel())


def available_host_bytes() -> int:
    """What this process may still use: the cgroup limit (containers, CI) or MemAvailable, whichever is lower."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                room = int(limit) - int(Path(usage_f).read_text().strip())
                avail = room if avail is None else min(avail, room)
            break
        except (OSError, ValueError):
            continue
    if avail is None:  # no /proc (not Linux): assume the physical memory is free
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return avail


def check_fits(b: Budget, w: Workload, available: int, where: str) -> None:
    """One clear line, before anything is loaded, when the plan cannot fit; it names the option that helps."""
    need = b.total_bytes
    if need <= available:
        return
    hints = []
    if not w.offload and b.parts["streams"] > b.parts["batch"]:
        hints.append("--offload-dir DIR (activations on disk)")
    if w.ranks == 1:
        hints.append("more ranks with torchrun (each holds its share of the prompts)")
    if b.parts["layer"] > available:
        hints.append("a machine or GPU with more memory: one layer's realignment alone needs "
                     f"{b.parts['layer'] / GiB:.1f} GiB")
    else:
        hints.append("fewer --realign-samples")
    raise InputError(f"realignment needs ~{need / GiB:.1f} GiB on {where} per rank "
                     f"({', '.join(f'{k} {v / GiB:.1f}' for k, v in b.parts.items())} GiB) but {available / GiB:.1f} "
                     f"GiB is available; try {' or '.join(hints)}")


def geometry_of(plan) -> Geometry:  # noqa: ANN001 - plan.Plan
    """The largest layer's realigned weights, from the plan (what the file will hold, not what the family says)."""
    per_layer: dict[int, int] = {}
    for t in plan.tensors:
        parts = t.source.name.split(".")
        if parts[0] == "blk" and t.source.is_matrix and t.qtype.native:
            n = 1
            for d in t.source.shape:
                n *= d
            per_layer[int(parts[1])] = per_layer.get(int(parts[1]), 0) + n
    m = plan.family.model
    hidden = int(m.cfg("hidden_size"))
    return Geometry(hidden=hidden, intermediate=int(m.cfg("intermediate_size")),
                    heads=int(m.cfg("num_attention_heads")), n_layers=int(m.cfg("num_hidden_layers")),
                    layer_weights=max(per_layer.values(), default=0))


def plan_budget(plan, opts, device: str, ranks: int = 1, speed: Speed | None = None,  # noqa: ANN001
                max_tokens: int = 128, batch: int = 8) -> tuple[Geometry, Workload, Budget]:
    """The budget of realigning `plan` with RealignOptions `opts` on `device` over `ranks` ranks: prompts
    tokenized as the realignment will (chat template, max_tokens cut), speed measured unless given."""
    from transformers import AutoTokenizer

    from ..chat import chat_ids
    from ..prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(plan.family.model.path)
    lens = [len(chat_ids(tok, p.text, max_tokens, p.system)) for src, label in ((opts.harmful, 1), (opts.benign, 0))
            for p in load_prompts(src, limit=opts.samples, expect_label=label)]
    g = geometry_of(plan)
    g = Geometry(**{**g.__dict__, "embedding_rows_bytes": len(lens) * max(lens) * g.hidden * 4})
    w = Workload(n_benign=opts.samples, n_harmful=opts.samples, mean_tokens=sum(lens) / len(lens),
                 max_tokens=max(lens), batch=batch, iters=opts.iters, ranks=ranks,
                 offload=getattr(opts, "offload_dir", None) is not None,
                 distill=getattr(opts, "distill_weight", 0.0) > 0)
    return g, w, estimate(g, w, speed or measure_speed(device))
