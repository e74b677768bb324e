"""The per-weight half of simulate.fake_quant: one autograd Function, computed in row chunks, in place.

simulate.py keeps the per-block math (fp16 d / dmin, integer sub-block codes, the block scale S and additive
term B) in plain autograd: those tensors are 1/16 .. 1/256 of the weight count. Everything that has one
value per weight is here, because that is where the memory went: through plain autograd every rounding,
clamp, where() and division of the rounder saved a float32 (or bool) copy of the matrix for the backward
pass, ~100 bytes per weight in all. This Function computes the same forward values with the same float32
operations in the same order (bit for bit: the exported bytes decode to them), saves one int8 level and
one bool "the gradient passes" flag per weight, and recomputes the rest in the backward pass from the
frozen weight W. The gradients are autograd's straight-through ones for the formulation below, with the
same elementwise operations and the same per-block reductions, so they are equal too.

The formulation (per weight; S, B per block; S' = S with 0 read as 1; start values *0):
    p     = (W - B) / S'                  unrounded level (IQ4_NL: the fractional table index, _interp)
    p0    = (W - B0) / S0'   live blocks, 0 elsewhere (recomputed each call: storing it costs 4 B/weight)
    z0    = q0 + clamp(nan_to_num(p0 - q0), +-RESIDUAL)
    z     = (live ? z0 + (p - p0) : p) + clamp(v, +-V_RANGE);   z = q0 where S == 0 or z is NaN
    level = round(z) clamped to [lo, hi];   value = level (IQ4_NL: table[level]);   w = S * value (+ B)
Straight-through backward: d value/d z = 1 inside [lo, hi] (IQ4_NL: the table's slope there), 0 outside and
where z was replaced; d z/d p = 1; d z/d v = 1 inside |v| <= V_RANGE.

Rows are processed in chunks so that the temporaries stay in cache on a CPU (and bounded on a GPU); the
per-block reductions never cross a row, so the chunking changes no sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

V_RANGE = 0.5  # |v| <= 0.5: at fixed scales a weight keeps its code or takes the neighbour on v's side
RESIDUAL = 0.5 - 2.0**-8  # start residual kept strictly inside the rounding cell (round(z0) == q0)
CHUNK_CPU = 1 << 15  # weights per chunk on a CPU: ~5 float32 temporaries of 128 KiB stay in L2
CHUNK_CUDA = 1 << 22  # on a GPU: big enough that launches do not matter, 16 MiB per temporary


@dataclass(frozen=True)
class Tables:
    """IQ4_NL's interpolation tables on the device, per interval k of the knots (k = 0..14)."""
    values: Tensor  # table[level] (float32, 16)
    x0: Tensor  # target interpolation: knot table[k], slope 1 / (table[k+1] - table[k])
    slope: Tensor
    vslope: Tensor  # value interpolation (knots 0..15): table[k+1] - table[k]


@dataclass(frozen=True)
class Grid:
    """What the rounder needs to know of the format: the level range and, for IQ4_NL, the value table."""
    lo: int
    hi: int
    table: tuple[int, ...] | None = None  # IQ4_NL: value = table[level], and p is a fractional index

    def tables(self, device: torch.device) -> Tables | None:
        if self.table is None:
            return None
        tab = torch.tensor(self.table, dtype=torch.float32, device=device)
        idx = torch.arange(len(self.table), dtype=torch.float32, device=device)
        # the same float32 operations simulate's _interp did per element, once per interval
        slope = (idx[1:] - idx[:-1]) / (tab[1:] - tab[:-1])
        vslope = (tab[1:] - tab[:-1]) / (idx[1:] - idx[:-1])
        return Tables(tab, tab[:-1].contiguous(), slope, vslope)


@dataclass(frozen=True)
class Start:
    """Frozen start state of one matrix: per weight in simulate._blocks' shape, per block with a last axis of 1."""
    q0: Tensor  # int8, the encoder's levels
    s0: Tensor  # float32 per block: the start scale S0 with 0 read as 1 (p0's divisor)
    b0: Tensor | None  # float32 per block: the start additive term B0 (types with a min)
    live0: Tensor  # bool per block: S0 != 0
    all_live: bool  # every block live (the usual case): the two where()s on live0 are identities


def _chunk_rows(W: Tensor) -> int:
    per_row = max(1, W[0].numel()) if W.shape[0] else 1
    return max(1, (CHUNK_CUDA if W.is_cuda else CHUNK_CPU) // per_row)


def target_into(out: Tensor, W: Tensor, B: Tensor | None, Sd: Tensor, tabs: Tables | None,
                idx_out: Tensor | None = None) -> Tensor:
    """out = (W - B) / Sd; IQ4_NL: then the fractional table index (simulate._interp's operations: y0 +
    (x - x0) * slope). idx_out receives the interval of each weight (the backward's slope)."""
    if B is None:
        torch.div(W, Sd, out=out)
    else:
        torch.sub(W, B, out=out).div_(Sd)
    if tabs is not None:
        k = (torch.searchsorted(tabs.values, out) - 1).clamp_(0, tabs.values.numel() - 2)
        out.sub_(tabs.x0[k]).mul_(tabs.slope[k]).add_(k.to(out.dtype))  # y0 = k exactly
        if idx_out is not None:
            idx_out.copy_(k)
    return out


def _round_forward(W: Tensor, v: Tensor, S: Tensor, B: Tensor | None, g: Grid, st: Start,
                   save: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """No-grad forward: (w, level int8, then for the backward: pass mask, IQ4_NL interval indices or None)."""
    tabs = g.tables(W.device)
    w = torch.empty_like(W)
    level = torch.empty(W.shape, dtype=torch.int8, device=W.device)
    mask = torch.empty(W.shape, dtype=torch.bool, device=W.device) if save else None
    k_p = torch.empty(W.shape, dtype=torch.int8, device=W.device) if save and tabs else None
    k_z = torch.empty(W.shape, dtype=torch.int8, device=W.device) if save and tabs else None
    zero = S == 0
    Sd = torch.where(zero, torch.ones_like(S), S)
    step = _chunk_rows(W)
    shape = (min(step, W.shape[0]),) + W.shape[1:]
    A, P, Z, Q = (torch.empty(shape, dtype=torch.float32, device=W.device) for _ in range(4))
    bad, tmp = (torch.empty(shape, dtype=torch.bool, device=W.device) for _ in range(2))
    for r0 in range(0, W.shape[0], step):
        r1 = min(W.shape[0], r0 + step)
        n, rs = r1 - r0, slice(r0, r1)
        a, p, z, q, bd, tp = A[:n], P[:n], Z[:n], Q[:n], bad[:n], tmp[:n]
        Wc = W[rs]
        target_into(a, Wc, None if st.b0 is None else st.b0[rs], st.s0[rs], tabs)  # p0
        if not st.all_live:
            a.masked_fill_(~st.live0[rs], 0.0)
        q.copy_(st.q0[rs])
        torch.sub(a, q, out=z).nan_to_num_().clamp_(-RESIDUAL, RESIDUAL).add_(q)  # z0
        target_into(p, Wc, None if B is None else B[rs], Sd[rs], tabs, None if k_p is None else k_p[rs])  # p
        torch.sub(p, a, out=a).add_(z)  # z0 + (p - p0)
        if not st.all_live:
            torch.where(st.live0[rs], a, p, out=a)
        a.add_(torch.clamp(v[rs], -V_RANGE, V_RANGE, out=z))  # z
        torch.ne(a, a, out=bd).logical_or_(zero[rs])  # NaN, or a zero scale: keep the encoder's level
        torch.where(bd, q, a, out=a)
        if save:
            torch.ge(a, g.lo, out=mask[rs]).logical_and_(torch.le(a, g.hi, out=tp)).logical_and_(bd.logical_not_())
            if k_z is not None:  # value interpolation interval: _interp's searchsorted over 0..15, as a ceil
                torch.clamp(a, g.lo, g.hi, out=z).ceil_().sub_(1).clamp_(0, g.hi - 1)
                k_z[rs].copy_(z)
        torch.round(a, out=p).clamp_(g.lo, g.hi).add_(0.0)  # + 0.0: an integer has no -0
        level[rs].copy_(p)
        value = p if tabs is None else tabs.values[level[rs].long()]
        torch.mul(value, S[rs], out=w[rs])
        if B is not None:
            w[rs].add_(B[rs])
    return w, level, mask, k_p, k_z


def _round_backward(gw: Tensor, W: Tensor, v: Tensor, S: Tensor, B: Tensor | None, g: Grid, level: Tensor,
                    mask: Tensor, k_p: Tensor | None, k_z: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dv, dS, dB) with autograd's elementwise operations and per-block sums for the formulation above."""
    tabs = g.tables(W.device)
    gw = gw.reshape(W.shape)
    zero = S == 0
    Sd = torch.where(zero, torch.ones_like(S), S)
    dv = torch.empty_like(v)
    dS_w, dS_p = torch.empty_like(S), torch.empty_like(S)  # from w = S * value, from p = (W - B) / S'
    dB_w, dB_p = (None, None) if B is None else (torch.empty_like(B), torch.empty_like(B))
    nil = torch.zeros((), dtype=torch.float32, device=W.device)
    step = _chunk_rows(W)
    shape = (min(step, W.shape[0]),) + W.shape[1:]
    T, P = (torch.empty(shape, dtype=torch.float32, device=W.device) for _ in range(2))
    vin, tmp = (torch.empty(shape, dtype=torch.bool, device=W.device) for _ in range(2))
    for r0 in range(0, W.shape[0], step):
        r1 = min(W.shape[0], r0 + step)
        n, rs = r1 - r0, slice(r0, r1)
        t, p, vi, tp, gc = T[:n], P[:n], vin[:n], tmp[:n], gw[rs]
        value = level[rs] if tabs is None else tabs.values[level[rs].long()]
        torch.sum(torch.mul(gc, value, out=t), -1, keepdim=True, out=dS_w[rs])
        if B is not None:
            torch.sum(gc, -1, keepdim=True, out=dB_w[rs])
        torch.mul(gc, S[rs], out=t)  # d value
        if tabs is not None:
            t.mul_(tabs.vslope[k_z[rs].long()])  # d soft value / d z
        torch.where(mask[rs], t, nil, out=t)  # d z = d p
        torch.ge(v[rs], -V_RANGE, out=vi).logical_and_(torch.le(v[rs], V_RANGE, out=tp))
        torch.where(vi, t, nil, out=dv[rs])
        if tabs is not None:
            t.mul_(tabs.slope[k_p[rs].long()])  # d p / d (W - B) / S'
            torch.div(W[rs], Sd[rs], out=p)
        else:
            target_into(p, W[rs], None if B is None else B[rs], Sd[rs], None)
        # div's backward: d S' = -dp * ((W - B) / S') / S',  d (W - B) = dp / S';  negated after the sum
        torch.sum(p.div_(Sd[rs]).mul_(t), -1, keepdim=True, out=dS_p[rs])
        if B is not None:
            torch.sum(t.div_(Sd[rs]), -1, keepdim=True, out=dB_p[rs])
    dS = dS_w + torch.where(zero, nil, dS_p.neg_())  # S' = where(S == 0, 1, S): no gradient where S == 0
    dB = None if B is None else dB_w + dB_p.neg_()
    return dv, dS, dB


class _Rounder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W: Tensor, v: Tensor, S: Tensor, B: Tensor | None, g: Grid, st: Start) -> Tensor:  # noqa: ANN001
        w, level, mask, k_p, k_z = _round_forward(W, v, S, B, g, st, save=True)
        ctx.grid = g
        ctx.save_for_backward(W, v, S, B, level, mask, k_p, k_z)
        return w

    @staticmethod
    def backward(ctx, gw: Tensor):  # noqa: ANN001, ANN205
        W, v, S, B, level, mask, k_p, k_z = ctx.saved_tensors
        dv, dS, dB = _round_backward(gw, W, v, S, B, ctx.grid, level, mask, k_p, k_z)
        return None, dv, dS, dB, None, None


def round_blocks(W: Tensor, v: Tensor, S: Tensor, B: Tensor | None, g: Grid, st: Start) -> tuple[Tensor, Tensor | None]:
    """(w, level): the dequantized weights of the rounded levels (blocked, float32; differentiable in v, S
    and B when grad is on) and the int8 levels (None on the autograd path: nobody needs them there)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (v, S, B)):
        return _Rounder.apply(W, v, S, B, g, st), None
    w, level, *_ = _round_forward(W, v.detach(), S.detach(), None if B is None else B.detach(), g, st, save=False)
    return w, level
