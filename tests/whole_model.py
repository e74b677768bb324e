"""The whole-model activation path that layer-wise onloading (qrealign_gguf/realign/onload.py) replaced, kept as
the test oracle: the model loaded whole in float32, one full forward per prompt with hooks recording every
layer's input and kwargs (formerly realign/capture.py), and the whole-model imatrix (formerly calib.py).
tests/test_layerwise.py runs both through the same realignment loop and requires the same bytes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qrealign_gguf.chat import chat_ids
from qrealign_gguf.prompts import load_prompts
from qrealign_gguf.realign.hidden import decoder, decoder_layers
from qrealign_gguf.realign.onload import clean


class _Stop(Exception):
    pass


@dataclass
class LayerCache:
    """Per prompt: FP inputs of every layer (n_layers + 1 entries; the last is the final layer's output),
    the layer kwargs, and the input of layer 0 under the quantized embedding."""
    fp: list[list[torch.Tensor]]  # [layer][prompt] -> (1, T, H)
    kwargs: list[list[dict]]  # [layer][prompt]
    q0: list[torch.Tensor]  # [prompt] -> (1, T, H): layer-0 input with the quantized token embedding


@torch.no_grad()
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
            kw[i].append(clean({k: v for k, v in kwargs.items() if k != "hidden_states"}))
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


class WholeModelSource:
    """pipeline.Activations from the whole model (the old path). The quantized embedding is the float one with
    the used rows replaced: the only rows a lookup of these prompts reads, so layer 0 sees what it saw before."""

    def __init__(self, model_dir: Path, family, ids: list[list[int]], n_fp: int, rows: np.ndarray,  # noqa: ANN001
                 q_rows: torch.Tensor | None, store) -> None:  # noqa: ANN001
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.layers = decoder_layers(self.model)
        self.n_layers, self.config, self.n_fp = len(self.layers), decoder(self.model).config, n_fp
        q = None
        if q_rows is not None:
            q = self.model.get_input_embeddings().weight.detach().clone()
            q[torch.from_numpy(rows)] = q_rows
        self.cache = capture(self.model, ids, q)
        self.q0 = self.cache.q0

    def kwargs(self, i: int) -> list[dict]:
        return self.cache.kwargs[i]

    def layer(self, i: int) -> torch.nn.Module:
        return self.layers[i]

    def fp_outputs(self, i: int, layer: torch.nn.Module) -> list[torch.Tensor]:
        return self.cache.fp[i + 1][: self.n_fp]

    def release(self, i: int) -> None:
        pass


@torch.inference_mode()
def whole_model_importance(family, calib: str | Path, n_samples: int = 128,  # noqa: ANN001 - ModelFamily
                           save_path: str | Path | None = None, console=None,  # noqa: ANN001
                           max_tokens: int = 512, offload_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """calib.compute_importance as it was (same signature, so tests can put it in its place): the whole model,
    hooks on every nn.Linear named in the plan, one forward per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrealign_gguf.imatrix import save_imatrix

    prompts = load_prompts(calib, limit=n_samples)
    path = family.model.path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    targets = {s.hf_name.removesuffix(".weight"): s.name for s in family.tensors() if s.is_matrix and s.hf_name}
    if "lm_head" not in targets and "token_embd.weight" in targets.values():
        targets["lm_head"] = "token_embd.weight"
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and mname in targets:
            gname = targets[mname]

            def hook(_m, args, gname=gname):  # noqa: ANN001, ANN202
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[gname] = sums.get(gname, 0) + (x * x).sum(0)
                counts[gname] = counts.get(gname, 0) + x.shape[0]

            hooks.append(module.register_forward_pre_hook(hook))
    n_tokens = 0
    for p in prompts:
        ids = chat_ids(tok, p.text, max_tokens)
        model(torch.tensor([ids]))
        n_tokens += len(ids)
    for h in hooks:
        h.remove()
    imatrix = {name: (s / counts[name]).numpy().astype(np.float32) for name, s in sums.items()}
    if save_path is not None:
        save_imatrix(save_path, imatrix, n_tokens, [str(calib)])
    return imatrix


def whole_model_last_token_states(model_dir, tok, prompts, max_tokens: int = 256, progress=None,  # noqa: ANN001
                                  batch: int = 8, offload_dir=None, family=None) -> torch.Tensor:  # noqa: ANN001
    """hidden.layerwise_last_token_states as it was before layer-wise onloading (same signature): the model loaded
    whole in float32, hidden.last_token_states over it."""
    from transformers import AutoModelForCausalLM

    from qrealign_gguf.realign.hidden import last_token_states

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return last_token_states(model, tok, prompts, max_tokens, batch=batch)
