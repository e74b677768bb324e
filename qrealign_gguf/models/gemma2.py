"""Gemma 2 -> GGUF arch "gemma2" (and the Gemma rules Gemma 3 shares).

Facts from the pinned upstream converter / llama.cpp:
  * Gemma's RMSNorm multiplies by (1 + w); llama.cpp's gemma graphs multiply by the stored weight, so every
    norm weight is written as 1 + w.
  * rope mode NEOX (HF layout): no Q/K permutation.
  * llama.cpp scales attention by 1/sqrt(head_dim), or 1/sqrt(n_embd/n_head) for the 27B layer counts; HF by
    query_pre_attn_scalar^-1/2. Where they differ the ratio is folded into the query (exact up to rounding):
    into attn_q for gemma2, into the query norm for gemma3 (a scale before an RMS norm would cancel).
  * gemma2 always soft-caps attention and final logits and always reads the embedding as output matrix,
    so configs without caps or with an untied lm_head are refused.
  * sliding window size and the per-layer pattern (from HF's layer_types) are written explicitly.
"""
from __future__ import annotations

import math

import gguf
import numpy as np

from ..errors import InputError
from .base import H, DecoderFamily


class GemmaBase(DecoderFamily):
    activations = ("gelu_pytorch_tanh", "gelu_tanh")  # llama.cpp's gemma graphs use the tanh GELU
    big_layer_count: int = -1  # the 27B model, where llama.cpp uses n_embd / n_head as the attention scale size

    def layer_tensors(self) -> dict[str, tuple[str, ...]]:
        # Gemma norms around both blocks: input / post_attention (-> attn_norm / attn_post_norm) and
        # pre_feedforward / post_feedforward (-> ffn_norm / ffn_post_norm); llama.cpp requires all four
        return {**super().layer_tensors(), "pre_feedforward_layernorm.weight": (H,),
                "post_feedforward_layernorm.weight": (H,)}

    def check_no_attention_bias(self) -> None:
        if self.c.get("attention_bias", False):
            raise InputError(f"{self.model.architecture} config sets attention_bias=true; llama.cpp's {self.arch} has "
                             "no attention output bias")

    def norm_shifted(self, name: str, x: np.ndarray) -> np.ndarray:
        return x + np.float32(1.0) if name.endswith("norm.weight") else x

    def query_scale(self) -> float:
        """Factor folded into the query so llama.cpp's fixed attention scale reproduces HF's."""
        scalar = self.c.get("query_pre_attn_scalar") or self.head_dim
        cpp_size = self.n_embd / self.n_head if self.n_layers == self.big_layer_count else self.head_dim
        c = math.sqrt(cpp_size / float(scalar))
        return 1.0 if abs(c - 1.0) < 1e-7 else c

    def add_swa(self, w: gguf.GGUFWriter) -> None:
        kinds = self.layer_types()
        if "sliding_attention" in kinds:
            w.add_sliding_window(int(self.c.get("sliding_window")))
            w.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])


class Gemma2Family(GemmaBase):
    arch = "gemma2"
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    hf_architectures = ("Gemma2ForCausalLM",)
    untied_output_ok = False
    big_layer_count = 46

    def check(self) -> None:
        self.check_no_attention_bias()
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if not self.c.get(key):
                raise InputError(f"Gemma2 config without {key}: llama.cpp's gemma2 always applies it")
        kinds = self.layer_types()
        if "sliding_attention" not in kinds:
            raise InputError("Gemma2 config without sliding layers: llama.cpp's gemma2 always uses sliding windows")

    def transform(self, name: str, x: np.ndarray) -> np.ndarray:
        x = self.norm_shifted(name, x)
        if ".attn_q." in name and (c := self.query_scale()) != 1.0:
            x = x * np.float32(c)
        return x

    def add_arch_metadata(self, w: gguf.GGUFWriter) -> None:
        w.add_attn_logit_softcapping(float(self.c.get("attn_logit_softcapping")))
        w.add_final_logit_softcapping(float(self.c.get("final_logit_softcapping")))
        self.add_swa(w)
