"""Importance matrix from calibration prompts: mean squared input activation of every linear layer.

This is what llama-imatrix measures inside llama.cpp; we measure it on the HF model in torch (the same
weights we are about to encode) and key it by GGUF tensor name. The model is read one decoder layer at a time
(realign/onload.py): memory is one layer's weights plus one layer's activations, whatever the depth, and the
sums are accumulated prompt by prompt in the order a whole-model forward would (the same float32 values).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .chat import chat_ids
from .imatrix import save_imatrix
from .models.base import ModelFamily
from .prompts import load_prompts

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def _targets(family: ModelFamily) -> tuple[dict[int, dict[str, str]], str | None]:
    """(layer -> {linear module inside the layer -> GGUF name}, GGUF name fed by the LM head's input or None)."""
    per_layer: dict[int, dict[str, str]] = {}
    head = None
    names = {}
    for s in family.tensors():
        text = family.hf_text_name(s.hf_name) if s.hf_name else None
        if not s.is_matrix or text is None:
            continue
        names[text] = s.name
        if m := _LAYER.match(text):
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = s.name
    head = names.get("lm_head.weight")
    if head is None and "token_embd.weight" in names.values():
        head = "token_embd.weight"  # tied embeddings: the output matmul reads token_embd
    return per_layer, head


@torch.inference_mode()
def importance_sums(family: ModelFamily, ids: list[list[int]], console: Console | None = None,
                    offload_dir: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per GGUF matrix: the sum over every token of its input squared (per column), and the token count -- sums,
    so that shards of the prompts can be added up. `ids` run one prompt at a time, as llama-imatrix does."""
    from .realign.onload import Onloaded, run_layer, token_rows
    from .realign.streams import Store

    per_layer, head = _targets(family)
    m = Onloaded(family.model.path, family)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(gname: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        sums[gname] = sums.get(gname, 0) + (x * x).sum(0)
        counts[gname] = counts.get(gname, 0) + x.shape[0]

    with Store(offload_dir) as store:
        xs = store.stream("x0")
        kws = m.record([(torch.tensor([seq]), None) for seq in ids], token_rows(ids), xs)
        for i in range(m.n_layers):
            layer = m.layer(i)
            hooks = []
            for mname, gname in per_layer.get(i, {}).items():
                module = layer.get_submodule(mname)
                if isinstance(module, torch.nn.Linear):
                    hooks.append(module.register_forward_pre_hook(lambda _m, args, g=gname: add(g, args[0])))
            nxt = store.stream(f"x{i + 1}")
            try:
                for j in range(len(ids)):
                    nxt.append(run_layer(layer, xs[j], kws[i][j]))
            finally:
                for h in hooks:
                    h.remove()
            m.release(layer)
            xs.drop()
            xs = nxt
            if console:
                console.print(f"importance: layer {i + 1}/{m.n_layers}, {len(ids)} prompts", highlight=False)
        if head is not None:
            norm = m.norm()
            for j in range(len(ids)):
                add(head, norm(xs[j]))
            m.release(norm)
        xs.drop()
    return sums, counts


def compute_importance(family: ModelFamily, calib: str | Path, n_samples: int = 128,
                       save_path: str | Path | None = None, console: Console | None = None,
                       max_tokens: int = 512, offload_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    prompts = load_prompts(calib, limit=n_samples)
    tok = AutoTokenizer.from_pretrained(family.model.path)
    ids = [chat_ids(tok, p.text, max_tokens) for p in prompts]
    sums, counts = importance_sums(family, ids, console, offload_dir)
    imatrix = {name: (s / counts[name]).numpy().astype(np.float32) for name, s in sums.items()}
    if save_path is not None:
        save_imatrix(save_path, imatrix, sum(len(x) for x in ids), [str(calib)])
    return imatrix
