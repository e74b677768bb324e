"""Importance matrix from calibration prompts: mean squared input activation of every linear layer.

This is what llama-imatrix measures inside llama.cpp; we measure it on the HF model in torch (the same
weights we are about to encode) and key it by GGUF tensor name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .chat import chat_ids
from .imatrix import save_imatrix
from .models.base import ModelFamily
from .prompts import load_prompts


@torch.inference_mode()
def compute_importance(family: ModelFamily, calib: str | Path, n_samples: int = 128,
                       save_path: str | Path | None = None, console: Console | None = None,
                       max_tokens: int = 512) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = load_prompts(calib, limit=n_samples)
    path = family.model.path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    # HF module name -> GGUF tensor name, for every matrix the file will hold
    targets = {s.hf_name.removesuffix(".weight"): s.name for s in family.tensors() if s.is_matrix and s.hf_name}
    if "lm_head" not in targets and "token_embd.weight" in targets.values():
        targets["lm_head"] = "token_embd.weight"  # tied embeddings: the output matmul reads token_embd
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
    for i, p in enumerate(prompts):
        ids = chat_ids(tok, p.text, max_tokens)
        model(torch.tensor([ids]))
        n_tokens += len(ids)
        if console and (i + 1) % 16 == 0:
            console.print(f"importance: {i + 1}/{len(prompts)} prompts, {n_tokens} tokens", highlight=False)
    for h in hooks:
        h.remove()
    imatrix = {name: (s / counts[name]).numpy().astype(np.float32) for name, s in sums.items()}
    if save_path is not None:
        save_imatrix(save_path, imatrix, n_tokens, [str(calib)])
    return imatrix
