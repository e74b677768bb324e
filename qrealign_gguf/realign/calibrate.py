"""Q-realign step 2: format-exact, dual-objective calibration of one decoder layer at a time.

For decoder layer l of the FINE-TUNED model, with X_q the layer's input under the already-quantized prefix
and Y the full-precision model's output of the layer:

    benign prompts   L_b = mean_i ||layer_q(X_q,i) - Y_i||^2 / ||Y_i||^2          (keep the task behaviour)
                         + last_weight * the same at the last prompt token only
    harmful prompts  L_h = mean_j max(0, t_l - probe_l(layer_q(X_q,j)[last]))      (back to the refusal side)
                         + mean_i max(0, probe_l(layer_q(X_q,i)[last]) - u_l)      (benign prompts stay off it)
    harmful prompts  L_a = the L_b form on harmful prompts, but towards the ALIGNED model's own states     (optional)
    loss             L   = L_b + harm_weight * L_h + distill_weight * L_a    (L_h only where the probe is reliable)

Two measured lessons shape these terms (docs/BENCHMARKS.md, Q-realign section). The push is a hinge that stops
at the target: a softplus keeps pulling past it, and because benign errors are ~1e-3 it always wins, which
restored refusal but also made the model refuse safe prompts. And the last prompt token is the same template
token for every prompt, so the cheapest way to raise harmful scores is to move that token's state for ALL
prompts (measured: benign prompts on the harmful side 3% -> 88% at layer 0); reconstruction of the benign
last token alone (last_weight) is too weak a brake at benign errors of ~1e-3, so benign prompts get their own
hinge in probe space: the change has to separate harmful from benign, as the aligned model does.

t_l / u_l are the median probe scores of the aligned model's own harmful / benign prompts at layer l
(ProbeSet.target / target_benign); a fixed --margin m sets t_l = m, u_l = -m; --margin-offset adds to t_l. layer_q runs the layer with every linear weight replaced by simulate.fake_quant:
the exact value the GGUF block format will store, differentiable in per-weight rounding offsets and
per-block scale/min changes (the role of learnable weight clipping). Adam on those, then export + pack
gives the bytes to write. Prompts of one kind run as one packed sequence (packing.py; see forward), their
losses read in the right-padded layout (Padded).
The relative benign error makes harm_weight mean the same thing in shallow and deep layers.

L_a (distill_weight > 0, which needs the aligned model) exists because a probe is one direction read at the last
token: on an identity-shift fine-tune it was met at every layer by restoring the old identity while the model still
complied (docs/BENCHMARKS.md round 12). L_a asks for the aligned model's whole state on the harmful prompts, every
token, as L_b asks for the fine-tune's on the benign ones; the benign term keeps the change selective.

Data parallel (dist.py, torchrun): each rank holds a shard of the prompts (global prompt i on rank i % N). Every
step draws the same GLOBAL minibatch on every rank (same generator), each rank runs the prompts of it that it owns,
its loss terms are sums divided by the global minibatch counts, so the ranks' losses and gradients add up to the
single-process ones; gradients are summed before Adam and the loss that picks the kept iterate is summed too, so
every rank takes the same steps and ends with the same blocks (checked). A single process (world None or size 1)
runs the plain code: the same bytes as before data parallelism existed.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call
from torch.nn.functional import relu

from .. import dist
from ..formats import codec, simulate
from ..formats.types import QType
from .packing import pack, unpack


@dataclass(frozen=True)
class RealignSettings:
    iters: int = 40  # optimizer steps per layer
    batch: int = 8  # prompts of each kind per step
    lr: float = 5e-3  # rounding offsets, in code units (scale multipliers get lr/10)
    harm_weight: float = 0.01  # measured best on the testbed (docs/BENCHMARKS.md round 6)
    margin: float | None = None  # probe logit harmful states should exceed; None: the aligned model's own (per layer)
    margin_offset: float = 1.5  # added to that target: push past the aligned median, where the hinge would stop
    probe_layers: str | None = None  # layers that get the probe term, e.g. "3-" (pipeline.parse_layers); None: all
    last_weight: float = 1.0  # benign last-token reconstruction, relative to the whole-sequence term
    benign_ceiling: float | None = None  # probe score benign prompts must stay below; None: the aligned benign median
    n_benign: int = 32
    n_harmful: int = 32
    max_tokens: int = 128
    seed: int = 0
    equalize: bool = False  # fold exact per-channel scalings into the layer first (equalize.py)
    distill_weight: float = 0.0  # L_a: harmful states towards the aligned model's (0: off; needs the aligned model)


@dataclass
class Target:
    """One linear weight of the layer and how it is written."""
    module: str  # path inside the decoder layer, e.g. "self_attn.q_proj"
    gguf_name: str
    qtype: QType
    row_order: np.ndarray | None = None  # GGUF row i = HF row row_order[i] (llama's Q/K rotary permutation)
    importance: np.ndarray | None = None


@dataclass
class AlignedStates:
    """The distill term's targets: the aligned model's own layer outputs of the harmful prompts (this rank's), and
    how many leading positions to leave out: the template prefix every calibration prompt shares (the default
    system message). Its states are the same in harmful and benign prompts, so pulling them towards the aligned
    model would fight the benign term on identical inputs and change every prompt's answer, not only harmful ones."""
    states: Sequence[torch.Tensor]
    skip: int = 0


def distill_loss(out: torch.Tensor, a: AlignedStates, kwargs: list, idx: list[int], p: Padded, last_weight: float,
                 count: int | None = None) -> torch.Tensor:
    """L_a: the benign_loss form towards the aligned states, on the positions after the shared prefix."""
    mask = p.mask.clone()
    mask[:, : a.skip] = False
    return benign_loss(out, pad(a.states, kwargs, idx).x, mask, p.last, last_weight, count)


@dataclass
class LayerStats:
    benign_start: float
    benign_end: float
    harm_start: float
    harm_end: float
    harmful_side_start: float  # fraction of harmful prompts with probe score > 0
    harmful_side_end: float
    benign_side_start: float  # fraction of BENIGN prompts with probe score > 0 (should not grow)
    benign_side_end: float
    probed: bool
    seconds: float
    distill_start: float = 0.0  # L_a before / after (0 when off; older checkpoints lack it)
    distill_end: float = 0.0


def at_last(h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, T, H) states of right-padded prompts -> (B, H) at each prompt's last real token."""
    return h[torch.arange(h.shape[0], device=h.device), last]


def _mean(per_prompt: torch.Tensor, count: int | None) -> torch.Tensor:
    """Mean over `count` prompts of which these are some (a rank's part of a global minibatch): their sum / count.
    All of them (a single process): the plain mean, so the single-process numbers are bit for bit the old ones."""
    if count is None or count == per_prompt.shape[0]:
        return per_prompt.mean()
    return per_prompt.sum() / count


def benign_loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, last: torch.Tensor,
                last_weight: float = 1.0, count: int | None = None) -> torch.Tensor:
    """Mean over prompts of the relative squared error on real (unpadded) tokens, plus last_weight times the
    relative error at each prompt's last token. count: the prompts the mean is over when these are only a rank's
    part of them (None: these)."""
    m = mask[..., None].to(out.dtype)
    num = (((out - target) ** 2) * m).sum((1, 2))
    den = ((target**2) * m).sum((1, 2)).clamp_min(1e-12)
    loss = _mean(num / den, count)
    if last_weight:
        o, t = at_last(out, last), at_last(target, last)
        loss = loss + last_weight * _mean(((o - t) ** 2).sum(1) / (t**2).sum(1).clamp_min(1e-12), count)
    return loss


def harm_loss(score: torch.Tensor, margin: float) -> torch.Tensor:
    """Harmful prompts: distance below the target score (0 once there)."""
    return relu(margin - score)


def benign_probe_loss(score: torch.Tensor, ceiling: float) -> torch.Tensor:
    """Benign prompts: distance above the benign target score (0 below it)."""
    return relu(score - ceiling)


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


@dataclass
class Padded:
    """Prompts of one kind, right-padded into one batch. Causal attention never lets a real token see the
    padding that follows it, so the longest prompt's layer kwargs (rotary tables, causal mask) serve all."""
    x: torch.Tensor | None  # (B, T, H); None when only the layout was asked for (the batch ran packed)
    mask: torch.Tensor  # (B, T) True on real tokens
    last: torch.Tensor  # (B,) index of each prompt's last token
    kwargs: dict


def pad(xs: list[torch.Tensor], kwargs: list[dict], idx: list[int], fill: bool = True) -> Padded:
    """Prompts idx of xs right-padded; fill=False: the layout only (mask, last, kwargs), no (B, T, H) copy."""
    lens = [xs[i].shape[1] for i in idx]
    t = max(lens)
    dev = xs[idx[0]].device
    x = xs[idx[0]].new_zeros(len(idx), t, xs[idx[0]].shape[2]) if fill else None
    mask = torch.zeros(len(idx), t, dtype=torch.bool, device=dev)
    for j, i in enumerate(idx):
        if x is not None:
            x[j, : lens[j]] = xs[i][0]
        mask[j, : lens[j]] = True
    last = torch.tensor(lens, device=dev) - 1
    return Padded(x, mask, last, kwargs[idx[lens.index(t)]])


def forward(layer: torch.nn.Module, weights: dict[str, torch.Tensor], xs: list[torch.Tensor], kwargs: list[dict],
            idx: list[int], prefix: int = 0) -> tuple[Padded, torch.Tensor]:
    """The layer on prompts idx of xs: their right-padded layout (mask, last) and the (B, T, H) output in it. Run
    packed (packing.py: the first `prefix` tokens, the same in every prompt, once; no padding) when the layer's
    kwargs allow it, else as the padded batch."""
    pk = pack(xs, kwargs, idx, prefix)
    p = pad(xs, kwargs, idx, fill=pk is None)
    if pk is None:
        return p, _run(layer, weights, p.x, p.kwargs)
    return p, unpack(_run(layer, weights, pk.x, pk.kwargs), pk)


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


@torch.no_grad()
def _evaluate(layer, weights, xb, yb, kb, xh, kh, ya, score, margin, ceiling, size,  # noqa: ANN001
              last_weight, world: dist.World, nb: int, nh: int, prefix: int = 0) -> tuple[float, float, float, float, float]:
    """(benign loss, harm loss, harmful fraction on the harmful side, benign fraction on the harmful side, distill
    loss) over all nb benign and nh harmful prompts, of which this rank holds xb and xh (ya: the aligned model's
    states for xh, or None)."""
    lb, sb = [], []
    for idx in _chunks(len(xb), size):
        p, out = forward(layer, weights, xb, kb, idx, prefix)
        y = pad(yb, kb, idx).x
        lb.append(benign_loss(out, y, p.mask, p.last, last_weight).item() * len(idx))
        if score is not None:
            sb.append(score(at_last(out, p.last)))
    la: list[float] = []
    sh: list[torch.Tensor] = []
    if score is not None or ya is not None:
        for idx in _chunks(len(xh), size):
            p, out = forward(layer, weights, xh, kh, idx, prefix)
            if score is not None:
                sh.append(score(at_last(out, p.last)).cpu())
            if ya is not None:
                la.append(distill_loss(out, ya, kh, idx, p, last_weight).item() * len(idx))
    none = torch.zeros(0)
    s, b = torch.cat(sh or [none]), torch.cat([x.cpu() for x in sb] or [none])
    t = [sum(lb), float(harm_loss(s, margin).sum()), float(benign_probe_loss(b, ceiling).sum()),
         float((s > 0).sum()), float((b > 0).sum()), sum(la)]
    if world.size > 1:  # a rank may hold no prompt of a kind: every statistic is a sum over the ranks
        t = dist.sum_floats(world, t, "summing the layer's statistics")
    if score is None:
        return t[0] / nb, 0.0, 0.0, 0.0, t[5] / nh
    return t[0] / nb, t[1] / nh + t[2] / nb, t[3] / nh, t[4] / nb, t[5] / nh


def initial_encoding(t: Target, w: torch.Tensor) -> np.ndarray:
    """The native encoder's bytes for w (the search's starting point): on the GPU when w lives there and the
    CUDA codec can run (byte-identical with the C codec by design), else the C codec."""
    from ..formats import cuda_codec

    dev = "auto" if w.is_cuda else "cpu"
    return cuda_codec.encode(t.qtype, w, t.importance, device=dev)


def realign_layer(layer: torch.nn.Module, targets: list[Target],
                  benign: tuple[list, list, list], harmful: tuple[list, list],
                  score: Callable[[torch.Tensor], torch.Tensor] | None, margin: float, ceiling: float,
                  s: RealignSettings, layer_index: int, world: dist.World | None = None, prefix: int = 0,
                  ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], LayerStats]:
    """Optimize one layer. benign = (X_q, Y_fp, kwargs) lists, harmful = (X_q, kwargs) lists, or with a third
    element, AlignedStates (the distill term's targets; needed when s.distill_weight > 0).
    Returns GGUF-layout packed bytes per tensor, the hard quantized weights (to propagate X_q), and stats.
    world: this rank in a data-parallel job (dist.py); benign and harmful then hold its shard of the prompts
    (dist.shard: global prompt i on rank i % size) and every rank returns the same bytes and stats. None: one process.
    prefix: how many leading tokens every prompt shares (the chat template's system part): computed once per batch."""
    world = world or dist.single()
    t0 = time.perf_counter()
    xb, yb, kb = benign
    xh, kh, ya = _harmful(harmful, s)
    nb, nh = dist.shard_total(world, len(xb)), dist.shard_total(world, len(xh))
    base = {t.module: layer.get_submodule(t.module).weight.detach().float() for t in targets}
    learn = {t.module: simulate.init_params(t.qtype, base[t.module], initial_encoding(t, base[t.module]),
                                            imatrix=t.importance) for t in targets}
    params = [g for t in targets for g in learn[t.module].param_groups(s.lr)]
    opt = torch.optim.Adam(params)
    gen = torch.Generator().manual_seed(s.seed * 100003 + layer_index)
    for p in layer.parameters():
        p.requires_grad_(False)

    ev = s.batch * 2
    start = _evaluate(layer, _weights(layer, targets, learn, base), xb, yb, kb, xh, kh, ya, score, margin,
                      ceiling, ev, s.last_weight, world, nb, nh, prefix)
    # auto-round's schedule: linear decay to zero, and keep the best minibatch iterate (the straight-through
    # gradient makes late iterates oscillate between rounding choices)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / max(s.iters, 1))
    best, best_loss = _snapshot(learn), float("inf")
    for _ in range(s.iters):
        opt.zero_grad(set_to_none=True)
        w = _weights(layer, targets, learn, base)
        ib = torch.randperm(nb, generator=gen)[: s.batch].tolist()  # the global minibatch, the same on every rank
        harm_term = (score is not None and s.harm_weight > 0) or ya is not None
        ih = torch.randperm(nh, generator=gen)[: s.batch].tolist() if harm_term else []
        loss = minibatch_loss(layer, w, benign, harmful, ib, ih, score, margin, ceiling, s, world, prefix)
        value = loss.item() if torch.is_tensor(loss) else loss
        if world.size > 1:  # every rank must keep the same iterate: decide on the summed loss
            value = dist.sum_floats(world, [value], "summing the loss")[0]
        if value < best_loss:  # the loss of the weights *before* this step
            best, best_loss = _snapshot(learn), value
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        _sum_grads(world, params)
        opt.step()
        sched.step()
        for t in targets:
            learn[t.module].project_()
    _restore(learn, best)

    with torch.no_grad():
        hard = _weights(layer, targets, learn, base)
    end = _evaluate(layer, hard, xb, yb, kb, xh, kh, ya, score, margin, ceiling, ev, s.last_weight, world, nb, nh,
                    prefix)
    packed: dict[str, np.ndarray] = {}
    for t in targets:
        data = codec.pack(t.qtype, simulate.export(t.qtype, base[t.module], learn[t.module]))
        # the bytes must decode to exactly what the loss saw (the format-exactness promise)
        check = codec.dequantize(data, t.qtype, base[t.module].shape[1])
        if not np.array_equal(check, hard[f"{t.module}.weight"].detach().cpu().numpy()):
            raise AssertionError(f"{t.gguf_name}: packed blocks do not decode to the simulated weight")
        packed[t.gguf_name] = data if t.row_order is None else data[t.row_order]
    if world.size > 1:  # the ranks go on with these weights: they must all hold the same ones
        dist.check_identical(world, f"the learned blocks of layer {layer_index}", _digest(packed))
    stats = LayerStats(start[0], end[0], start[1], end[1], start[2], end[2], start[3], end[3], score is not None,
                       time.perf_counter() - t0, start[4], end[4])
    return packed, {k: v.detach() for k, v in hard.items()}, stats


def minibatch_loss(layer: torch.nn.Module, w: dict[str, torch.Tensor], benign: tuple[list, list, list],
                   harmful: tuple[list, list], ib: list[int], ih: list[int],
                   score: Callable[[torch.Tensor], torch.Tensor] | None, margin: float, ceiling: float,
                   s: RealignSettings, world: dist.World, prefix: int = 0) -> torch.Tensor | float:
    """This rank's part of the loss of the global minibatch ib (benign) / ih (harmful; empty: no probe term), global
    prompt indices: sums over the prompts it owns divided by the global counts, so the ranks' parts (and their
    gradients) add up to the single-process loss. 0.0 on a rank that owns none of them."""
    (xb, yb, kb), (xh, kh, ya) = benign, _harmful(harmful, s)
    mine_b = dist.local_part(world, ib)
    mine_h = dist.local_part(world, ih)
    probe_on = bool(ih) and score is not None
    loss: torch.Tensor | float = 0.0
    if mine_b:
        p, out = forward(layer, w, xb, kb, mine_b, prefix)
        loss = benign_loss(out, pad(yb, kb, mine_b).x, p.mask, p.last, s.last_weight, count=len(ib))
    if mine_h and (probe_on or ya is not None):
        ph, out_h = forward(layer, w, xh, kh, mine_h, prefix)
    if probe_on:
        probe: torch.Tensor | float = 0.0
        if mine_h:
            probe = _mean(harm_loss(score(at_last(out_h, ph.last)), margin), len(ih))
        if mine_b:
            probe = probe + _mean(benign_probe_loss(score(at_last(out, p.last)), ceiling), len(ib))
        loss = loss + s.harm_weight * probe
    if mine_h and ya is not None:
        loss = loss + s.distill_weight * distill_loss(out_h, ya, kh, mine_h, ph, s.last_weight, count=len(ih))
    return loss


def _harmful(harmful: tuple, s: RealignSettings) -> tuple[list, list, AlignedStates | None]:
    """(X_q, kwargs, Y_aligned or None): the distill term's targets are used exactly when it is on."""
    xh, kh, *rest = harmful
    ya = rest[0] if rest else None
    if (s.distill_weight > 0) != (ya is not None):
        raise AssertionError("distill_weight > 0 needs the aligned model's states of the harmful prompts, and only then")
    return xh, kh, ya


def _sum_grads(world: dist.World, groups: list[dict]) -> None:
    """Gradients summed over the ranks before the step, so every rank steps with the global minibatch's gradient.
    A parameter no rank has a gradient for stays without one (Adam skips it, as in a single process)."""
    if world.size == 1:
        return
    ps = [p for g in groups for p in g["params"]]
    has = dist.sum_floats(world, [float(p.grad is not None) for p in ps], "summing gradients")
    for p, n in zip(ps, has):
        if n:
            if p.grad is None:  # this rank owned none of the step's prompts
                p.grad = torch.zeros_like(p)
            dist.all_reduce_sum_(world, p.grad, "summing gradients")


def _digest(packed: dict[str, np.ndarray]) -> bytes:
    h = hashlib.sha256()
    for name in sorted(packed):
        h.update(name.encode() + b"\0" + np.ascontiguousarray(packed[name]).tobytes())
    return h.digest()


@torch.no_grad()
def propagate(layer: torch.nn.Module, hard: dict[str, torch.Tensor], xs: list[torch.Tensor],
              kwargs: list[dict], size: int = 16, prefix: int = 0) -> list[torch.Tensor]:
    """The next layer's quantized-prefix inputs: this layer run with its final (stored) weights. Per prompt, so a
    rank propagates its own shard and nothing is exchanged."""
    out: list[torch.Tensor] = []
    for idx in _chunks(len(xs), size):
        p, y = forward(layer, hard, xs, kwargs, idx, prefix)
        out += [y[j : j + 1, : int(p.last[j]) + 1].clone() for j in range(len(idx))]
    return out
