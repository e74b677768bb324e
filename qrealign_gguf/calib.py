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

from . import dist
from .chat import chat_ids
from .errors import InputError
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


@torch.inference_mode()  # importance_sums' tensors are inference tensors: summed in place below
def compute_importance(family: ModelFamily, calib: str | Path, n_samples: int = 128,
                       save_path: str | Path | None = None, console: Console | None = None,
                       max_tokens: int = 512, offload_dir: str | Path | None = None,
                       world: dist.World | None = None) -> dict[str, np.ndarray]:
    """The mean squared input of every matrix over the first n_samples prompts of `calib`. world (dist.py): each
    rank runs its shard of the prompts and the sums and token counts are added over the ranks before the mean, so
    every rank gets the importance of all prompts (float32 sums: one process's values up to summation order)."""
    from transformers import AutoTokenizer

    world = world or dist.single()
    prompts = load_prompts(calib, limit=n_samples)
    if len(prompts) < world.size:  # a rank without prompts would hold no sums to add
        raise InputError(f"--calib {calib}: {len(prompts)} prompts for {world.size} ranks; give every rank at least one")
    tok = AutoTokenizer.from_pretrained(family.model.path)
    ids = [chat_ids(tok, p.text, max_tokens, p.system) for p in dist.shard(world, prompts)]
    sums, counts = importance_sums(family, ids, console, offload_dir)
    n_tokens = sum(len(x) for x in ids)
    if world.size > 1:  # sorted: every rank adds the same tensors in the same order
        names = sorted(sums)
        for name in names:
            dist.all_reduce_sum_(world, sums[name], "summing the importance matrix")
        total = dist.sum_floats(world, [counts[n] for n in names] + [n_tokens], "summing the importance matrix")
        counts = {n: int(c) for n, c in zip(names, total)}
        n_tokens = int(total[-1])
    imatrix = {name: (s / counts[name]).numpy().astype(np.float32) for name, s in sums.items()}
    if save_path is not None:
        save_imatrix(save_path, imatrix, n_tokens, [str(calib)])
    return imatrix
