"""The GGUF block formats in torch: ggml's dequantization, bit for bit, and a differentiable fake-quantizer.

dequant(qtype, params)
    ggml's dequantize_row_* on the format's own parameters (see native/qrealign.h), in float32 with the
    same operations in the same order, so the result is bit-identical with codec.dequantize on CPU and
    CUDA (plain elementwise IEEE mul/add/sub; never torch.compile this, fusion into FMAs breaks it).

init_params / fake_quant / export (Q-realign's inner loop, weight-only)
    init_params starts from exactly what the native encoder writes (codec.quantize -> codec.unpack) and
    adds learnables that are all zero / one at the start:
      v        per weight, rounding offset in code units, kept in [-0.5, 0.5]
      d_mul    per block, multiplier of the fp16 scale d, kept in [0.5, 1.5]
      m_mul    per block, multiplier of the fp16 min / dmin (types with a min), kept in [0.5, 1.5]
      sc_off   per sub-block, offset of the integer scale code, in code units (K-quants)
      mn_off   per sub-block, offset of the integer min code (Q2_K, Q4_K, Q5_K)
    fake_quant's forward value is always a weight the format can store: d/dmin are rounded to fp16,
    sub-block codes and weight codes to integers in their ranges, each with a straight-through
    estimator, and the dequantization is the same function dequant uses. export reads those hard values
    out, so codec.dequantize(codec.pack(export(...))) == fake_quant(...) bit for bit at every step.
    Call Learn.project_() after each optimizer step to keep the learnables in range.

Custom types with outliers (QR4_KO = Q4_K + 4 fp16 outliers per 256 weights): dequant is the base
format's, then the outliers replace their positions (as the C decoder). For realignment the outliers stay
fixed at the encoder's choice (positions and fp16 values: Learn.oidx / Learn.oval, not learnable) and the
learnables are those of the Q4_K part; fake_quant's value at an outlier position is the outlier, so its
rounding offset gets no gradient and export writes the start's outliers back.

Why auto-round's SignRound (additive offset V in [-0.5, 0.5], rounded with a straight-through estimator)
and not AdaRound's rectified sigmoid: the forward pass is the hard, deployable weight at every step
(AdaRound trains a soft interpolation and needs a regulariser and annealing before it is exact), so the
loss is measured on exactly what gets exported, and a rounding choice is re-made whenever a scale moves.

The rounder sees z = z0 + (p - p0) + v, where p is the weight's unrounded level at the current scales
((W - B) / S), p0 the same at the start scales, and z0 = q0 + clamp(p0 - q0, +-(0.5 - 2^-8)) the
encoder's code q0 plus its rounding residual kept inside q0's rounding cell. At the start z == z0 and
round(z0) == q0 always, even where the encoder did not round to nearest (imatrix searches; RTN codes
taken against the fp32 scale before it was stored as fp16). Where the encoder did round to nearest at
these scales, z is just auto-round's W/s + V, so weights near a rounding boundary need only a small
push to flip, and |v| <= 0.5 allows the two neighbours floor/ceil, as in auto-round. Sub-block scale
codes get additive offsets rather than multipliers so that a code of 0 can grow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import codec
from .simulate_grad import RESIDUAL, V_RANGE, Grid, Start, round_blocks, target_into  # noqa: F401 (re-exported)
from .types import QType, qtype as _lookup

IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MUL_RANGE = (0.5, 1.5)  # d_mul / m_mul


@dataclass(frozen=True)
class _Fmt:
    """Code geometry. A weight's level is the integer ggml multiplies by its scale; stored code =
    (level + qoff) mod 256 (mod 256: Q8_0 / Q6_K scales are int8 two's complement)."""
    family: str  # "sym" (y = level*d), "affine" (level*d + m), "iq4nl" (d*table[code]), "k" (dl*level - ml)
    lo: int
    hi: int
    qoff: int = 0
    sc_lo: int = 0  # K-quants: sub-block scale levels sc_lo..sc_hi, code = (level + sc_off) mod 256
    sc_hi: int = 0
    sc_off: int = 0
    mn_hi: int = 0  # K-quants with a min: min codes 0..mn_hi (0: symmetric)


FORMATS: dict[str, _Fmt] = {
    "Q4_0": _Fmt("sym", -8, 7, 8),
    "Q5_0": _Fmt("sym", -16, 15, 16),
    "Q8_0": _Fmt("sym", -128, 127),
    "Q4_1": _Fmt("affine", 0, 15),
    "Q5_1": _Fmt("affine", 0, 31),
    "IQ4_NL": _Fmt("iq4nl", 0, 15),
    "Q2_K": _Fmt("k", 0, 3, sc_hi=15, mn_hi=15),
    "Q3_K": _Fmt("k", -4, 3, 4, sc_lo=-32, sc_hi=31, sc_off=32),
    "Q4_K": _Fmt("k", 0, 15, sc_hi=63, mn_hi=63),
    "Q5_K": _Fmt("k", 0, 31, sc_hi=63, mn_hi=63),
    "Q6_K": _Fmt("k", -32, 31, 32, sc_lo=-128, sc_hi=127),
    "QR4_KO": _Fmt("k", 0, 15, sc_hi=63, mn_hi=63),  # qrealign's Q4_K + outliers (formats/types.py)
    "QR5_K128": _Fmt("k", 0, 31, sc_hi=63, mn_hi=63),  # qrealign's Q5_K on 128-weight super-blocks
}


def _info(t: QType | str) -> tuple[QType, _Fmt]:
    qt = _lookup(t) if isinstance(t, str) else t
    if qt.name not in FORMATS:
        raise ValueError(f"{qt.name} is not a block-quantized type")
    return qt, FORMATS[qt.name]


def _blocks(x: Tensor, qt: QType) -> Tensor:
    """(rows, cols) -> (rows, nb, block), K-quants (rows, nb, nsub, block/nsub): one scale per last axis."""
    rows, cols = x.shape
    shape = (rows, cols // qt.block_size) + ((qt.nsub, qt.block_size // qt.nsub) if qt.nsub else (qt.block_size,))
    return x.reshape(shape)


def _level(code: Tensor, lo: int, off: int) -> Tensor:
    return ((code.long() - off - lo) % 256 + lo).float()


def _code(level: Tensor, off: int) -> np.ndarray:
    return ((level.detach().long() + off) % 256).to(torch.uint8).cpu().numpy()


# ---- the formats: per family, the scale S and additive term B of y = S * value (+ B) -----------------
# Every family multiplies exactly as ggml does: the product d*sc of the K-quants is one float32 rounding,
# then S * level; ggml's "- ml" is "+ (-ml)" (IEEE: identical); Q3_K/Q6_K's (q - 4)/(q - 32) is an exact
# integer. The value is the level itself, or the IQ4_NL table entry.

def _legacy_sym(f: _Fmt, d: Tensor, dmin: Tensor | None, sc: Tensor | None, mn: Tensor | None):
    return d[..., None], None  # Q4_0/Q5_0: (q - 8|16) * d;  Q8_0: int8(q) * d;  IQ4_NL: d * kvalues[q]


def _legacy_affine(f: _Fmt, d: Tensor, dmin: Tensor | None, sc: Tensor | None, mn: Tensor | None):
    return d[..., None], dmin[..., None]  # Q4_1/Q5_1: q * d + m


def _kquant(f: _Fmt, d: Tensor, dmin: Tensor | None, sc: Tensor | None, mn: Tensor | None):
    """Q2_K/Q4_K/Q5_K: (d*sc) * q - dmin*mn;  Q3_K: (d*(sc-32)) * (q-4);  Q6_K: (d*int8(sc)) * (q-32)."""
    dl = (d[..., None] * sc)[..., None]
    return dl, None if mn is None else -(dmin[..., None] * mn)[..., None]


FAMILIES = {"sym": _legacy_sym, "affine": _legacy_affine, "iq4nl": _legacy_sym, "k": _kquant}


def _table(like: Tensor) -> Tensor:
    return torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=like.device)


def _combine(S: Tensor, value: Tensor, B: Tensor | None) -> Tensor:
    y = S * value
    return y if B is None else y + B


def _put_outliers(y: Tensor, qt: QType, oidx: Tensor, oval: Tensor, inplace: bool = False) -> Tensor:
    """y (rows, cols) with y[block b, position oidx[b, j]] = oval[b, j] (float16 -> float32, exact)."""
    rows, cols = y.shape
    nb = cols // qt.block_size
    base = torch.arange(nb, device=y.device).view(1, nb, 1) * qt.block_size
    pos = (oidx.to(y.device).long() + base).reshape(rows, -1)
    return (y.scatter_ if inplace else y.scatter)(1, pos, oval.to(y.device).float().reshape(rows, -1))


def to_torch(p: codec.BlockParams, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """BlockParams (numpy) -> the dict dequant takes: uint8 codes, float16 scales (+ uint8 oidx, float16 oval)."""
    out = {k: getattr(p, k) for k in ("q", "d", "dmin", "sc", "mn", "oidx", "oval") if getattr(p, k) is not None}
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in out.items()}


def dequant(t: QType | str, params: dict[str, Tensor]) -> Tensor:
    """ggml's dequantize_row_* of (q, d[, dmin][, sc][, mn]) in the codec's layout; (rows, cols) float32."""
    qt, f = _info(t)
    q = params["q"]
    d = params["d"].float()
    dmin = params["dmin"].float() if "dmin" in params and params["dmin"] is not None else None
    sc = _level(params["sc"], f.sc_lo, f.sc_off) if f.family == "k" else None
    mn = params["mn"].float() if f.mn_hi else None
    S, B = FAMILIES[f.family](f, d, dmin, sc, mn)
    level = _level(q, f.lo, f.qoff)
    value = _table(level)[level.long()] if f.family == "iq4nl" else level
    y = _combine(S, _blocks(value, qt), B).reshape(q.shape)
    return _put_outliers(y, qt, params["oidx"], params["oval"]) if qt.n_outliers else y


# ---- learnable parameterization ----------------------------------------------------------------------

def _ste(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward: exactly `hard` (hard - (+0.0) keeps even a -0.0; an infinite soft gives inf - inf = NaN,
    read as 0); backward: the gradient of `soft`."""
    return hard.detach() - (soft.detach() - soft).nan_to_num(0.0)


def _fp16(x: Tensor) -> Tensor:
    return _ste(x.detach().to(torch.float16).float(), x)


def _round(x: Tensor, lo: float, hi: float) -> Tensor:
    """Round half to even and clamp (+ 0.0: an integer has no -0); gradient 1 inside [lo, hi], 0 outside."""
    return _ste(torch.round(x.detach()).clamp(lo, hi) + 0.0, x.clamp(lo, hi))


@dataclass
class Learn:
    """Start state (frozen, decoded from the encoder's output) and learnables of one weight matrix.
    Blocked tensors have _blocks' shape; per-block (rows, nb); per-sub-block (rows, nb, nsub). The start's
    per-weight state is one int8 level (start.q0): the unrounded start levels p0 and z0 are recomputed from
    W in each call (simulate_grad), because storing them costs 8 bytes per weight."""
    qtype: str
    start: Start  # q0 (int8, blocked), start scales S0 / B0 and which blocks are live (per block)
    d0: Tensor
    m0: Tensor | None
    sc0: Tensor | None
    mn0: Tensor | None
    v: Tensor
    d_mul: Tensor
    m_mul: Tensor | None = None
    sc_off: Tensor | None = None
    mn_off: Tensor | None = None
    oidx: Tensor | None = None  # types with outliers: fixed positions (rows, nb, n) uint8 ...
    oval: Tensor | None = None  # ... and fp16 values (rows, nb, n) float16, not learned

    def parameters(self) -> list[Tensor]:
        return [t for t in (self.v, self.d_mul, self.m_mul, self.sc_off, self.mn_off) if t is not None]

    def param_groups(self, lr: float = 5e-3, scale_lr: float | None = None) -> list[dict]:
        """Optimizer groups: offsets in code units (v, sc_off, mn_off) at lr, the fp16 scale multipliers at
        scale_lr (default lr/10: a 1% change of d moves every code of the block)."""
        offsets = [t for t in (self.v, self.sc_off, self.mn_off) if t is not None]
        muls = [t for t in (self.d_mul, self.m_mul) if t is not None]
        return [{"params": offsets, "lr": lr}, {"params": muls, "lr": lr / 10 if scale_lr is None else scale_lr}]

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the learnables into the ranges fake_quant uses (call after each optimizer step)."""
        f = FORMATS[self.qtype]
        self.v.clamp_(-V_RANGE, V_RANGE)
        for m in (self.d_mul, self.m_mul):
            if m is not None:
                m.clamp_(*MUL_RANGE)
        if self.sc_off is not None:
            self.sc_off.copy_(torch.maximum(torch.minimum(self.sc_off, f.sc_hi + 0.5 - self.sc0), f.sc_lo - 0.5 - self.sc0))
        if self.mn_off is not None:
            self.mn_off.copy_(torch.maximum(torch.minimum(self.mn_off, f.mn_hi + 0.5 - self.mn0), -0.5 - self.mn0))


def _scales(f: _Fmt, L: Learn) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The stored scale values the learnables stand for, hard in the forward pass: fp16 d/dmin, integer codes."""
    d = _fp16(L.d0 * L.d_mul.clamp(*MUL_RANGE))
    dmin = None if L.m0 is None else _fp16(L.m0 * L.m_mul.clamp(*MUL_RANGE))
    sc = None if L.sc0 is None else _round(L.sc0 + L.sc_off, f.sc_lo, f.sc_hi)
    mn = None if L.mn0 is None else _round(L.mn0 + L.mn_off, 0, f.mn_hi)
    return d, dmin, sc, mn


def _grid(f: _Fmt) -> Grid:
    return Grid(f.lo, f.hi, IQ4NL_VALUES if f.family == "iq4nl" else None)


def _target(f: _Fmt, W: Tensor, S: Tensor, B: Tensor | None) -> Tensor:
    """The unrounded level of each weight at scales (S, B): (W - B) / S; IQ4_NL: the fractional table
    index (linear between entries, so that rounding it picks the nearest entry). S == 0 reads as 1."""
    S = torch.where(S == 0, torch.ones_like(S), S)
    shape = torch.broadcast_shapes(W.shape, S.shape, () if B is None else B.shape)
    out = torch.empty(shape, dtype=torch.float32, device=W.device)
    return target_into(out, W.float(), B, S, None if f.family != "iq4nl" else _grid(f).tables(W.device))


def _forward(t: QType | str, W: Tensor, L: Learn) -> tuple[Tensor, Tensor | None, tuple]:
    """(W_hat, levels, scales): everything fake_quant and export need, on one code path. The per-block
    scales are plain autograd; the per-weight rounding is simulate_grad's Function (levels: int8, None
    when the Function records a graph)."""
    qt, f = _info(t)
    scales = _scales(f, L)
    S, B = FAMILIES[f.family](f, *scales)
    w_hat, level = round_blocks(_blocks(W.float(), qt), L.v, S, B, _grid(f), L.start)
    w_hat = w_hat.reshape(W.shape)
    if qt.n_outliers:  # in place: the Function keeps nothing of its output
        w_hat = _put_outliers(w_hat, qt, L.oidx, L.oval, inplace=True)
    return w_hat, level, scales


def init_params(t: QType | str, W: Tensor | np.ndarray, packed: np.ndarray | None = None,
                imatrix: np.ndarray | Tensor | None = None) -> Learn:
    """Learnables starting at the native encoder's solution: codec.quantize(W, t, imatrix) unless `packed`
    (that encoding of W) is given. Tensors live on W's device; the learnables have requires_grad."""
    qt, f = _info(t)
    W = torch.as_tensor(W)
    dev = W.device
    if packed is None:
        im = None if imatrix is None else np.asarray(torch.as_tensor(imatrix).detach().float().cpu())
        packed = codec.quantize(W.detach().float().cpu().numpy(), qt, im)
    bp = to_torch(codec.unpack(packed, qt, W.shape[1]), dev)
    d0 = bp["d"].float()
    m0 = bp["dmin"].float() if "dmin" in bp else None
    sc0 = _level(bp["sc"], f.sc_lo, f.sc_off) if f.family == "k" else None
    mn0 = bp["mn"].float() if f.mn_hi else None
    q0 = _blocks(_level(bp["q"], f.lo, f.qoff), qt).to(torch.int8)  # levels lie in -128..127
    zeros = lambda x: None if x is None else torch.zeros_like(x, requires_grad=True)  # noqa: E731
    ones = lambda x: None if x is None else torch.ones_like(x, requires_grad=True)  # noqa: E731
    with torch.no_grad():
        S0, B0 = FAMILIES[f.family](f, d0, m0, sc0, mn0)  # what _scales gives at the start learnables
        live0 = S0 != 0
        start = Start(q0, torch.where(live0, S0, torch.ones_like(S0)), B0, live0, bool(live0.all()))
    L = Learn(qt.name, start, d0, m0, sc0, mn0,
              v=torch.zeros(q0.shape, dtype=torch.float32, device=dev, requires_grad=True),
              d_mul=ones(d0), m_mul=ones(m0), sc_off=zeros(sc0), mn_off=zeros(mn0),
              oidx=bp.get("oidx"), oval=bp.get("oval"))
    with torch.no_grad():  # at the start z == z0 and round(z0) == q0: the levels are the encoder's
        _, level, _ = _forward(qt, W, L)
        assert torch.equal(level, q0)
    return L


def fake_quant(t: QType | str, W: Tensor, learn: Learn) -> Tensor:
    """Differentiable W_hat (rows, cols) float32; its value is exactly what export's codes dequantize to."""
    return _forward(t, W, learn)[0]


@torch.no_grad()
def export(t: QType | str, W: Tensor, learn: Learn) -> codec.BlockParams:
    """The hard codes and fp16 scales of fake_quant's current forward value, for codec.pack."""
    qt, f = _info(t)
    _, level, (d, dmin, sc, mn) = _forward(qt, W, learn)
    f16 = lambda x: None if x is None else x.to(torch.float16).cpu().numpy()  # noqa: E731
    return codec.BlockParams(
        q=_code(level, f.qoff).reshape(W.shape), d=f16(d), dmin=f16(dmin),
        sc=None if sc is None else _code(sc, f.sc_off), mn=None if mn is None else _code(mn, 0),
        oidx=None if learn.oidx is None else learn.oidx.cpu().numpy(),
        oval=None if learn.oval is None else learn.oval.cpu().numpy())
