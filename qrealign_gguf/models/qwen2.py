"""Qwen2 / Qwen2.5 -> GGUF arch "qwen2".

llama.cpp's qwen2 graph uses rope mode NEOX (HF's half-split layout), so no Q/K permutation; the q/k/v
projections carry biases, which TensorNameMap maps like the weights. llama.cpp's qwen2 has no sliding-window
attention, so a config that really uses it (use_sliding_window with a window shorter than the context) is
refused; and the attention output is n_embd wide, so head_dim * heads must equal hidden_size.
"""
from __future__ import annotations

import gguf

from ..errors import InputError
from .base import KV, Q, DecoderFamily


class Qwen2Family(DecoderFamily):
    arch = "qwen2"
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    hf_architectures = ("Qwen2ForCausalLM",)

    def check(self) -> None:
        if "sliding_attention" in self.layer_types() or (
                self.c.get("use_sliding_window", False)
                and (self.c.get("sliding_window") or 1 << 62) < self.c.max_position_embeddings):
            raise InputError("this Qwen2 config uses sliding-window attention, which llama.cpp's qwen2 does not implement")
        if self.head_dim * self.n_head != self.n_embd:
            raise InputError(f"head_dim {self.head_dim} x {self.n_head} heads != hidden_size {self.n_embd}; "
                             "llama.cpp's qwen2 cannot hold this shape")

    def layer_tensors(self) -> dict[str, tuple[str, ...]]:
        # HF's Qwen2Attention always has q/k/v biases (and none on o_proj): a checkpoint without them is incomplete
        return {**super().layer_tensors(), "self_attn.q_proj.bias": (Q,), "self_attn.k_proj.bias": (KV,),
                "self_attn.v_proj.bias": (KV,)}
