"""Layer-by-layer activation caches for calibration.

One full-precision forward pass per prompt records, for every decoder layer, its input hidden states and
the keyword arguments the model hands it (rotary cos/sin, position ids, ...). Layer l's FP output is layer
l+1's FP input, so a single pass gives every target. Prompts run one at a time without padding, so every
cached position is a real token and causal attention needs no mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .hidden import decoder, decoder_layers

_DROP = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


class _Stop(Exception):
    pass


@dataclass
class LayerCache:
    """Per prompt: FP inputs of every layer (n_layers + 1 entries; the last is the final layer's output),
    the layer kwargs, and the input of layer 0 under the quantized embedding."""
    fp: list[list[torch.Tensor]]  # [layer][prompt] -> (1, T, H)
    kwargs: list[list[dict]]  # [layer][prompt]
    q0: list[torch.Tensor]  # [prompt] -> (1, T, H): layer-0 input with the quantized token embedding


def _clean(kwargs: dict) -> dict:
    out = {k: v for k, v in kwargs.items() if k not in _DROP}
    out["use_cache"] = False
    return out


@torch.no_grad()  # not inference_mode: the cached tensors feed autograd later
def capture(model, ids: list[list[int]], quantized_embedding: torch.Tensor | None) -> LayerCache:  # noqa: ANN001
    layers = decoder_layers(model)
    n = len(layers)
    device = next(model.parameters()).device
    fp: list[list[torch.Tensor]] = [[] for _ in range(n + 1)]
    kw: list[list[dict]] = [[] for _ in range(n)]

    def pre(i: int):  # noqa: ANN202
        def fn(_m, args, kwargs):  # noqa: ANN001, ANN202
            h = args[0] if args else kwargs["hidden_states"]
            fp[i].append(h.detach().clone())
            kw[i].append(_clean({k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return fn

    def post(_m, _inp, out):  # noqa: ANN001, ANN202
        fp[n].append((out[0] if isinstance(out, tuple) else out).detach().clone())

    hs = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hs.append(layers[-1].register_forward_hook(post))
    try:
        for seq in ids:
            decoder(model)(torch.tensor([seq], device=device), use_cache=False)
    finally:
        for h in hs:
            h.remove()

    q0 = fp[0]
    if quantized_embedding is not None:  # layer-0 input as the deployed file computes it
        emb = model.get_input_embeddings()
        saved = emb.weight.data
        q0 = []

        def grab(_m, args, kwargs):  # noqa: ANN001, ANN202
            q0.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            raise _Stop

        h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            emb.weight.data = quantized_embedding.to(saved.device, saved.dtype)
            for seq in ids:
                try:
                    decoder(model)(torch.tensor([seq], device=device), use_cache=False)
                except _Stop:
                    pass
        finally:
            emb.weight.data = saved
            h.remove()
    return LayerCache(fp, kw, q0)
