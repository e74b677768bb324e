"""Llama and Mistral (dense) -> GGUF arch "llama".

Facts from the pinned upstream converter / llama.cpp:
  * llama.cpp's llama graph uses rope mode NORM (adjacent pairs rotate), HF uses the half-split layout, so
    Q and K rows (weights and biases) are permuted per head (K with the KV head count).
  * rope_type "llama3" is not a GGUF scaling type: upstream writes the per-frequency divisors as the tensor
    rope_freqs.weight (read once, shared by all layers).
  * n_rot must equal the head size, so partial rotary is refused.
  * Mistral v0.1's sliding window has no llama-arch equivalent; the context length is capped to it, the range
    in which full attention is the same computation.
"""
from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np

from ..errors import InputError
from .base import FF, H, KV, Q, DecoderFamily, TensorSource, llama3_rope_factors, permute_rotary


class LlamaFamily(DecoderFamily):
    arch = "llama"
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    rope_types = ("default", "linear", "yarn", "llama3")

    def check(self) -> None:
        prf = self.rope().get("partial_rotary_factor", self.c.get("partial_rotary_factor"))
        if prf not in (None, 1, 1.0):
            raise InputError(f"partial_rotary_factor={prf} is not supported by llama.cpp's llama arch")

    def layer_tensors(self) -> dict[str, tuple[str, ...]]:
        out = super().layer_tensors()
        if self.c.get("attention_bias", False):  # HF: one flag for the q, k, v and o biases
            out.update({"self_attn.q_proj.bias": (Q,), "self_attn.k_proj.bias": (KV,), "self_attn.v_proj.bias": (KV,),
                        "self_attn.o_proj.bias": (H,)})
        if self.c.get("mlp_bias", False):
            out.update({"mlp.gate_proj.bias": (FF,), "mlp.up_proj.bias": (FF,), "mlp.down_proj.bias": (H,)})
        return out

    def rows_independent(self, name: str) -> bool:
        return ".attn_q." not in name and ".attn_k." not in name  # the rotary permutation interleaves rows

    def transform(self, name: str, x: np.ndarray) -> np.ndarray:
        if ".attn_q." in name:
            return permute_rotary(x, self.n_head)
        if ".attn_k." in name:
            return permute_rotary(x, self.n_head_kv)
        return x

    def add_arch_metadata(self, w: gguf.GGUFWriter) -> None:
        w.add_rope_dimension_count(self.head_dim)

    def context_length(self) -> int:
        window = self.c.get("sliding_window")
        return min(int(window or 1 << 62), super().context_length())

    def extra_tensors(self) -> Iterator[TensorSource]:
        rope = self.rope()
        if rope.get("rope_type") == "llama3":
            factors = llama3_rope_factors(rope, self.head_dim)
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            yield TensorSource(name, factors.shape, lambda: factors, "")
