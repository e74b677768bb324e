"""A batch of prompts as ONE packed sequence for a decoder layer: the template prefix they all share, once, then
each prompt's own tokens, under an attention mask that lets every prompt's tokens see the prefix and their own
earlier tokens only.

Why: calibration prompts share the chat template's system part (Qwen2.5's default system message: about 20 of a
prompt's 30-60 tokens) and differ in length, so a right-padded batch of B prompts runs the prefix B times and the
padding too. Everything in a decoder layer but the attention scores works token by token (the projections and
the MLP: nearly all of its FLOPs), so the packed sequence costs (prefix + the prompts' own tokens) instead of
B x the longest prompt. Unpacked, the output equals the padded batch's at every real token up to float summation
order; the loss's gradient reaches the shared prefix once per prompt through the gather, as it would per prompt.

A layer is a black box called with the kwargs its decoder gave it (onload.record): the position inputs
(rotary tables, position ids) are taken at each packed token's real position from the longest prompt's kwargs,
and the causal mask is replaced by the packed one. A kwarg this module does not know that has the prompt's
length as a dimension could be positional, so then it declines (None) and the caller pads instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# kwargs of HF decoder layers that index token positions (dimension 1 after a batch dimension of 1, or the only one)
POSITIONAL = ("position_ids", "cache_position", "position_embeddings", "position_embeddings_global",
              "position_embeddings_local")


@dataclass
class Packed:
    x: torch.Tensor  # (1, L, H): the shared prefix once, then each prompt's tokens after it
    index: torch.Tensor  # (B, T) the packed position of prompt j's token t (0 on padding: masked by the caller)
    kwargs: dict


def pack(xs: list[torch.Tensor], kwargs: list[dict], idx: list[int], prefix: int) -> Packed | None:
    """Prompts idx of xs ((1, T_i, H) each) packed, sharing their first `prefix` tokens (the caller knows these are
    the same tokens in every prompt; their states are taken from the first prompt). None when the layer's kwargs
    hold something this cannot re-index."""
    lens = [xs[i].shape[1] for i in idx]
    t = max(lens)
    share = max(0, min(prefix, min(lens) - 1))  # every prompt keeps at least its last token as its own
    kw = kwargs[idx[lens.index(t)]]
    if "attention_mask" not in kw:
        return None
    pos, seg, index = list(range(share)), [-1] * share, torch.zeros(len(idx), t, dtype=torch.long)
    index[:, :share] = torch.arange(share)
    for j, n in enumerate(lens):
        index[j, share:n] = torch.arange(len(pos), len(pos) + n - share)
        pos += range(share, n)
        seg += [j] * (n - share)
    p = torch.tensor(pos)
    dev = xs[idx[0]].device
    out: dict = {}
    for k, v in kw.items():
        if k == "attention_mask":
            if v is not None and not (torch.is_tensor(v) and v.ndim == 4 and v.shape[:2] == (1, 1)
                                      and tuple(v.shape[-2:]) == (t, t)):
                return None
            out[k] = _mask(torch.tensor(seg, device=dev), p.to(dev), v, xs[idx[0]].dtype)
        elif k in POSITIONAL:
            taken = _take(v, p.to(dev), t)
            if taken is False:
                return None
            out[k] = taken
        elif _has_length(v, t):
            return None
        else:
            out[k] = v
    x = torch.cat([xs[idx[0]][:, :share]] + [xs[i][:, share:] for i in idx], dim=1)
    return Packed(x, index.to(dev), out)


def unpack(y: torch.Tensor, p: Packed) -> torch.Tensor:
    """(1, L, H) layer output -> (B, T, H) in the right-padded layout (padding positions hold a real token's state;
    the caller's mask ignores them)."""
    return y[0][p.index]


def _mask(seg: torch.Tensor, pos: torch.Tensor, recorded: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, L, L) mask: a packed token sees a token of the shared prefix (segment -1) or of its own prompt, and
    only where the mask the decoder made for one whole prompt lets real position pos[q] see pos[k] (causal, and a
    sliding window where the layer has one); without a recorded mask, causal. The packed order keeps each prompt's
    order, so causality within the prefix and a prompt is the packed order too. Same kind as the recorded mask
    (bool: True = attend; float: additive), additive float when none was recorded (eager and SDPA take it)."""
    n = seg.shape[0]
    i = torch.arange(n, device=seg.device)
    ok = (i[None, :] <= i[:, None]) & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))
    if recorded is not None:
        rec = recorded[0, 0] if recorded.dtype == torch.bool else recorded[0, 0] == 0
        ok &= rec[pos][:, pos]
        if recorded.dtype == torch.bool:
            return ok[None, None]
        dtype = recorded.dtype
    m = torch.zeros(n, n, dtype=dtype, device=seg.device).masked_fill_(~ok, torch.finfo(dtype).min)
    return m[None, None]


def _take(v, pos: torch.Tensor, t: int):  # noqa: ANN001, ANN202 - a tensor, a tuple of them, or None
    """v at the packed tokens' real positions; False when v has no position dimension of length t."""
    if v is None:
        return None
    if isinstance(v, tuple | list):
        parts = [_take(u, pos, t) for u in v]
        return False if any(u is False for u in parts) else type(v)(parts)
    if not torch.is_tensor(v):
        return False
    if v.ndim == 1 and v.shape[0] == t:
        return v[pos]
    if v.ndim >= 2 and v.shape[0] == 1 and v.shape[1] == t:
        return v[:, pos]
    return False


def _has_length(v, t: int) -> bool:  # noqa: ANN001
    if isinstance(v, tuple | list):
        return any(_has_length(u, t) for u in v)
    return torch.is_tensor(v) and t in v.shape
