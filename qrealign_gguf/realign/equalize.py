"""Exact-equivalence transforms folded into a decoder layer's weights before its blocks are encoded (the
optional step of Q-realign's calibration; the per-channel scaling of AWQ, kept to the cases that are exact in
llama.cpp's graph and need no extra tensor):

    attn_norm -> q, k, v    norm weight g / s,  q/k/v columns * s        (RMSNorm output feeds them only)
    v -> o                  v rows and bias / s, o columns * s           (attention mixes tokens, not channels;
                                                                          GQA: one v row feeds n_rep o columns)
    ffn_norm -> gate, up    norm weight g / s,  gate/up columns * s
    up -> down              up rows / s,        down columns * s         (silu(gate) * up is linear in up)

In exact arithmetic the layer computes the same function; what changes is which input channels the block
quantizer treats as large. s = mean|x_c|^alpha over the benign calibration tokens (normalized to geometric mean
1), alpha from a grid, chosen per group by the consumer's own quantization error on those tokens
sum ||(Q(W s) - W s) x/s||^2 = trace(dW C dW^T), C = the scaled inputs' Gram matrix. alpha = 0 is the identity,
so on the calibration data a group is never worse than plain encoding. An imatrix moves with the scaling:
importance (E[x^2] per column) becomes importance / s^2.

Layers of the llama/qwen2 shape only (plain RMSNorm weights, q/k/v/o and gate/up/down projections).

Data parallel (dist.py): each rank runs its shard of the benign prompts; the statistics are sums (Gram matrix,
sum |x|, token count) added over the ranks before anything is derived from them, and the alphas of the grid are
shared out among the ranks (each error is computed by one rank and sent to all), so every rank folds the same
scales. A single process (world None) runs the plain code.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import dist
from ..formats import codec
from ..formats.types import QType

ALPHAS = tuple(a / 10 for a in range(10))  # 0.0 .. 0.9
NORM_MODULES = ("input_layernorm", "post_attention_layernorm")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def supported(layer: torch.nn.Module) -> str | None:
    """None when the layer has the shape these transforms assume, else why not. Biases are fine: those of
    q/k/o/gate/down are added after the scaled columns, those of v/up are scaled with their rows."""
    for name in NORM_MODULES + LINEARS:
        try:
            layer.get_submodule(name)
        except AttributeError:
            return f"no {name} module"
    return None


# -- pure math ------------------------------------------------------------------------------------------------
def channel_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|x|^alpha, geometric mean 1 (so weights keep their overall size); all-zero channels get 1."""
    m = np.maximum(mean_abs.astype(np.float64), 1e-8 * max(float(mean_abs.max()), 1e-30))
    s = m**alpha
    return (s / np.exp(np.log(s).mean())).astype(np.float32)


def group_error(weights: list[np.ndarray], gram: np.ndarray, s: np.ndarray,
                encode: Callable[[int, np.ndarray, np.ndarray], np.ndarray]) -> float:
    """sum over the group's matrices of trace(dW C_s dW^T), dW = encode(W s) - W s, C_s = diag(1/s) C diag(1/s):
    the output error on the calibration tokens after scaling. encode(k, W_scaled, s) -> dequantized W_scaled."""
    c = (gram / np.outer(s, s)).astype(np.float32)  # float32 products: ranking alphas needs no more
    total = 0.0
    for k, w in enumerate(weights):
        ws = w * s[None, :]
        dw = (encode(k, ws, s) - ws).astype(np.float32)
        total += float(np.einsum("ij,ij->", dw @ c, dw, dtype=np.float64))
    return total


def rtn_encoder(qtypes: list[QType], importance: list[np.ndarray | None]) -> Callable[[int, np.ndarray, np.ndarray], np.ndarray]:
    """The native encoder (RTN, or imatrix-weighted with importance / s^2), decoded: what plain encoding of
    the scaled weight would store."""
    def enc(k: int, ws: np.ndarray, s: np.ndarray) -> np.ndarray:
        im = None if importance[k] is None else (importance[k] / (s.astype(np.float64) ** 2)).astype(np.float32)
        data = codec.quantize(np.ascontiguousarray(ws, dtype=np.float32), qtypes[k], imatrix=im)
        return codec.dequantize(data, qtypes[k], ws.shape[1])
    return enc


# -- statistics of one layer on the calibration prompts ---------------------------------------------------------
@dataclass
class InputStats:
    gram: np.ndarray  # (in, in) float64, sum over real tokens of x x^T
    mean_abs: np.ndarray  # (in,) mean |x| over real tokens


def collect(layer: torch.nn.Module, run: Callable[[], None], modules: tuple[str, ...],
            world: dist.World | None = None) -> dict[str, InputStats]:
    """Input statistics of `modules` while run() pushes the calibration prompts (one unpadded prompt per call
    of the module, as capture.py caches them) through the layer. world: run() pushes this rank's shard, and the
    sums are added over the ranks (every rank gets the same statistics)."""
    acc: dict[str, list] = {m: [None, None, 0] for m in modules}

    def hook(name: str):  # noqa: ANN202
        def fn(_m, args):  # noqa: ANN001, ANN202
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
            a = acc[name]
            g, s = x.T @ x, x.abs().sum(0)
            a[0] = g if a[0] is None else a[0] + g
            a[1] = s if a[1] is None else a[1] + s
            a[2] += x.shape[0]
        return fn

    hs = [layer.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hs:
            h.remove()
    if world is not None and world.size > 1:
        for m, a in acc.items():
            n = layer.get_submodule(m).weight.shape[1]  # a rank may have run no prompt: its sums are zeros
            g = a[0] if a[0] is not None else torch.zeros(n, n, dtype=torch.float64)
            s = a[1] if a[1] is not None else torch.zeros(n, dtype=torch.float64)
            a[0] = dist.all_reduce_sum_(world, g.contiguous(), "summing equalization statistics")
            a[1] = dist.all_reduce_sum_(world, s.contiguous(), "summing equalization statistics")
            a[2] = int(dist.sum_floats(world, [a[2]], "summing equalization statistics")[0])
    return {m: InputStats(a[0].numpy(), (a[1] / max(a[2], 1)).numpy()) for m, a in acc.items()}


# -- folding the scales into the layer --------------------------------------------------------------------------
@dataclass
class Scales:
    attn: np.ndarray  # (hidden,)          attn_norm -> q/k/v columns
    vo: np.ndarray  # (n_kv * head_dim,) v rows -> o columns (each v row feeds n_rep o columns)
    ffn: np.ndarray  # (hidden,)          ffn_norm -> gate/up columns
    ud: np.ndarray  # (intermediate,)    up rows -> down columns


def o_columns(vo: np.ndarray, n_heads: int, n_kv: int) -> np.ndarray:
    """Per o column (q head h, channel c) the scale of the v row it reads: (kv head h // n_rep, c)."""
    hd = vo.size // n_kv
    rep = n_heads // n_kv
    return vo.reshape(n_kv, 1, hd).repeat(rep, axis=1).reshape(-1)


@torch.no_grad()
def fold(layer: torch.nn.Module, s: Scales, n_heads: int, n_kv: int) -> None:
    """Apply the four transforms in place (float32). Exact up to float rounding of the products."""
    def t(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x).to(like.device, like.dtype)

    g = layer.get_submodule
    g("input_layernorm").weight.div_(t(s.attn, g("input_layernorm").weight))
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        g(m).weight.mul_(t(s.attn, g(m).weight)[None, :])
    v = g("self_attn.v_proj")
    v.weight.div_(t(s.vo, v.weight)[:, None])
    if v.bias is not None:
        v.bias.div_(t(s.vo, v.bias))
    g("self_attn.o_proj").weight.mul_(t(o_columns(s.vo, n_heads, n_kv), v.weight)[None, :])
    g("post_attention_layernorm").weight.div_(t(s.ffn, g("post_attention_layernorm").weight))
    for m in ("mlp.gate_proj", "mlp.up_proj"):
        g(m).weight.mul_(t(s.ffn, g(m).weight)[None, :])
    up = g("mlp.up_proj")
    up.weight.div_(t(s.ud, up.weight)[:, None])
    if up.bias is not None:
        up.bias.div_(t(s.ud, up.bias))
    g("mlp.down_proj").weight.mul_(t(s.ud, up.weight)[None, :])


def column_scale(module: str, s: Scales, n_heads: int, n_kv: int) -> np.ndarray | None:
    """The input-column scale a linear received (its imatrix is divided by its square)."""
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return s.attn
    if module == "self_attn.o_proj":
        return o_columns(s.vo, n_heads, n_kv)
    if module in ("mlp.gate_proj", "mlp.up_proj"):
        return s.ffn
    if module == "mlp.down_proj":
        return s.ud
    return None


# -- one layer: statistics, the four searches ---------------------------------------------------------------------
@dataclass
class GroupReport:
    name: str
    alpha_used: bool  # False: the identity was best
    error_before: float
    error_after: float


def choose(layer: torch.nn.Module, run: Callable[[], None], encoders: dict[str, tuple[QType, np.ndarray | None]],
           n_heads: int, n_kv: int, world: dist.World | None = None) -> tuple[Scales, list[GroupReport]]:
    """The four groups' scales for `layer` (not yet folded). encoders: module -> (type, imatrix) of the linears
    that are block-encoded, i.e. written from the folded layer. A linear outside it (e.g. an F16 fallback for rows
    that are no multiple of the block) is written from the source, unscaled, so every group that touches it keeps
    the identity: scaling only its partner would change the model the file computes.
    world: run() pushes this rank's shard of the prompts (see collect); every rank returns the same scales."""
    stats = collect(layer, run, ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"), world)
    reports: list[GroupReport] = []

    def group(name: str, consumers: tuple[str, ...], st: InputStats, mean_abs: np.ndarray,
              expand: Callable[[np.ndarray], np.ndarray] = lambda s: s, producer: str | None = None) -> np.ndarray:
        # the producer is the linear whose rows take 1/s (v, up); the norms' 1/s is always written (F32)
        if not all(m in encoders for m in consumers + ((producer,) if producer else ())):
            return np.ones_like(mean_abs, dtype=np.float32)
        mods = list(consumers)
        ws = [layer.get_submodule(m).weight.detach().float().cpu().numpy() for m in mods]
        enc = rtn_encoder([encoders[m][0] for m in mods], [encoders[m][1] for m in mods])

        def error(a: float) -> float:
            return group_error(ws, st.gram, expand(channel_scales(mean_abs, a)), enc)

        best_s, best, base = np.ones_like(mean_abs, dtype=np.float32), None, None
        for a, err in zip(ALPHAS, _grid_errors(world, error)):
            s = channel_scales(mean_abs, a)  # alpha 0: exactly ones, the identity
            base = err if a == 0 else base
            if best is None or err < best:
                best_s, best = s, err
        reports.append(GroupReport(name, not np.all(best_s == 1), float(base), float(best)))
        return best_s

    hd_all = stats["self_attn.o_proj"].mean_abs
    vo_mean = hd_all.reshape(n_kv, n_heads // n_kv, -1).mean(1).reshape(-1)  # the o columns sharing a v row
    return Scales(
        attn=group("attn_norm->qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   stats["self_attn.q_proj"], stats["self_attn.q_proj"].mean_abs),
        vo=group("v->o", ("self_attn.o_proj",), stats["self_attn.o_proj"], vo_mean,
                 lambda s: o_columns(s, n_heads, n_kv), producer="self_attn.v_proj"),
        ffn=group("ffn_norm->gate/up", ("mlp.gate_proj", "mlp.up_proj"), stats["mlp.gate_proj"],
                  stats["mlp.gate_proj"].mean_abs),
        ud=group("up->down", ("mlp.down_proj",), stats["mlp.down_proj"], stats["mlp.down_proj"].mean_abs,
                 producer="mlp.up_proj"),
    ), reports


def _grid_errors(world: dist.World | None, error: Callable[[float], float]) -> list[float]:
    """error(alpha) for every alpha of the grid: in a data-parallel job alpha k is computed by rank k % size and
    sent to all (exactly: the others add 0.0), so the search costs each rank a share of the grid."""
    if world is None or world.size == 1:
        return [error(a) for a in ALPHAS]
    mine = [error(a) if k % world.size == world.rank else 0.0 for k, a in enumerate(ALPHAS)]
    return dist.sum_floats(world, mine, "sharing the equalization search")
