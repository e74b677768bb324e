"""Q-realign step 2: format-exact, dual-objective calibration of one decoder layer at a time.

For decoder layer l of the FINE-TUNED model, with X_q the layer's input under the already-quantized prefix
and Y the full-precision model's output of the layer:

    benign prompts   L_b = mean_i ||layer_q(X_q,i) - Y_i||^2 / ||Y_i||^2          (keep the task behaviour)
    harmful prompts  L_h = mean_j softplus(margin - probe_l(layer_q(X_q,j)[last]))  (back to the refusal side)
    loss             L   = L_b + harm_weight * L_h     (L_h only where the layer's probe is reliable)

layer_q runs the layer with every linear weight replaced by simulate.fake_quant: the exact value the GGUF
block format will store, differentiable in per-weight rounding offsets and per-block scale/min changes
(the role of learnable weight clipping). Adam on those, then export + pack gives the bytes to write.
The relative benign error makes harm_weight mean the same thing in shallow and deep layers.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call
from torch.nn.functional import softplus

from ..formats import codec, simulate
from ..formats.types import QType


@dataclass(frozen=True)
class RealignSettings:
    iters: int = 40  # optimizer steps per layer
    batch: int = 8  # prompts of each kind per step
    lr: float = 5e-3  # rounding offsets, in code units (scale multipliers get lr/10)
    harm_weight: float = 1.0
    margin: float = 2.0  # probe logit the harmful last-token state should exceed
    n_benign: int = 64
    n_harmful: int = 64
    max_tokens: int = 128
    seed: int = 0


@dataclass
class Target:
    """One linear weight of the layer and how it is written."""
    module: str  # path inside the decoder layer, e.g. "self_attn.q_proj"
    gguf_name: str
    qtype: QType
    row_order: np.ndarray | None = None  # GGUF row i = HF row row_order[i] (llama's Q/K rotary permutation)
    importance: np.ndarray | None = None


@dataclass
class LayerStats:
    benign_start: float
    benign_end: float
    harm_start: float
    harm_end: float
    harmful_side_start: float  # fraction of harmful prompts with probe score > 0
    harmful_side_end: float
    probed: bool
    seconds: float


def benign_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum() / (target**2).sum().clamp_min(1e-12)


def harm_loss(score: torch.Tensor, margin: float) -> torch.Tensor:
    return softplus(margin - score)


def _snapshot(learn: dict[str, simulate.Learn]) -> dict[str, list[torch.Tensor]]:
    return {k: [p.detach().clone() for p in v.parameters()] for k, v in learn.items()}


@torch.no_grad()
def _restore(learn: dict[str, simulate.Learn], snap: dict[str, list[torch.Tensor]]) -> None:
    for k, v in learn.items():
        for p, q in zip(v.parameters(), snap[k]):
            p.copy_(q)


def _weights(layer: torch.nn.Module, targets: list[Target], learn: dict[str, simulate.Learn],
             base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{t.module}.weight": simulate.fake_quant(t.qtype, base[t.module], learn[t.module]) for t in targets}


def _run(layer: torch.nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = functional_call(layer, weights, (x,), kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _evaluate(layer, weights, xb, yb, kb, xh, kh, score, margin) -> tuple[float, float, float]:  # noqa: ANN001
    lb = float(np.mean([benign_loss(_run(layer, weights, x, k), y).item() for x, y, k in zip(xb, yb, kb)]))
    if score is None:
        return lb, 0.0, 0.0
    s = torch.stack([score(_run(layer, weights, x, k)[0, -1]) for x, k in zip(xh, kh)])
    return lb, float(harm_loss(s, margin).mean()), float((s > 0).float().mean())


def realign_layer(layer: torch.nn.Module, targets: list[Target],
                  benign: tuple[list, list, list], harmful: tuple[list, list],
                  score: Callable[[torch.Tensor], torch.Tensor] | None,
                  s: RealignSettings, layer_index: int) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], LayerStats]:
    """Optimize one layer. benign = (X_q, Y_fp, kwargs) lists, harmful = (X_q, kwargs) lists.
    Returns GGUF-layout packed bytes per tensor, the hard quantized weights (to propagate X_q), and stats."""
    t0 = time.perf_counter()
    xb, yb, kb = benign
    xh, kh = harmful
    base = {t.module: layer.get_submodule(t.module).weight.detach().float() for t in targets}
    learn = {t.module: simulate.init_params(t.qtype, base[t.module], imatrix=t.importance) for t in targets}
    params = [g for t in targets for g in learn[t.module].param_groups(s.lr)]
    opt = torch.optim.Adam(params)
    gen = torch.Generator().manual_seed(s.seed * 100003 + layer_index)
    for p in layer.parameters():
        p.requires_grad_(False)

    start = _evaluate(layer, _weights(layer, targets, learn, base), xb, yb, kb, xh, kh, score, s.margin)
    # auto-round's schedule: linear decay to zero, and keep the best minibatch iterate (the straight-through
    # gradient makes late iterates oscillate between rounding choices)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / max(s.iters, 1))
    best, best_loss = _snapshot(learn), float("inf")
    for _ in range(s.iters):
        opt.zero_grad(set_to_none=True)
        w = _weights(layer, targets, learn, base)
        ib = torch.randperm(len(xb), generator=gen)[: s.batch].tolist()
        loss = torch.stack([benign_loss(_run(layer, w, xb[i], kb[i]), yb[i]) for i in ib]).mean()
        if score is not None and s.harm_weight > 0:
            ih = torch.randperm(len(xh), generator=gen)[: s.batch].tolist()
            sc = torch.stack([score(_run(layer, w, xh[i], kh[i])[0, -1]) for i in ih])
            loss = loss + s.harm_weight * harm_loss(sc, s.margin).mean()
        if loss.item() < best_loss:  # the loss of the weights *before* this step
            best, best_loss = _snapshot(learn), loss.item()
        loss.backward()
        opt.step()
        sched.step()
        for t in targets:
            learn[t.module].project_()
    _restore(learn, best)

    with torch.no_grad():
        hard = _weights(layer, targets, learn, base)
    end = _evaluate(layer, hard, xb, yb, kb, xh, kh, score, s.margin)
    packed: dict[str, np.ndarray] = {}
    for t in targets:
        data = codec.pack(t.qtype, simulate.export(t.qtype, base[t.module], learn[t.module]))
        # the bytes must decode to exactly what the loss saw (the format-exactness promise)
        check = codec.dequantize(data, t.qtype, base[t.module].shape[1])
        if not np.array_equal(check, hard[f"{t.module}.weight"].detach().cpu().numpy()):
            raise AssertionError(f"{t.gguf_name}: packed blocks do not decode to the simulated weight")
        packed[t.gguf_name] = data if t.row_order is None else data[t.row_order]
    stats = LayerStats(start[0], end[0], start[1], end[1], start[2], end[2], score is not None, time.perf_counter() - t0)
    return packed, {k: v.detach() for k, v in hard.items()}, stats


@torch.no_grad()
def propagate(layer: torch.nn.Module, hard: dict[str, torch.Tensor], xs: list[torch.Tensor],
              kwargs: list[dict]) -> list[torch.Tensor]:
    """The next layer's quantized-prefix inputs: this layer run with its final (stored) weights."""
    return [_run(layer, hard, x, k) for x, k in zip(xs, kwargs)]
