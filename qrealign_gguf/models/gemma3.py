"""Gemma 3 (text) -> GGUF arch "gemma3": Gemma3ForCausalLM, and the language model of
Gemma3ForConditionalGeneration (vision tower and projector are left out; the GGUF is text-only).

On top of the Gemma rules (gemma2.py): query/key norms (also 1 + w), no attention soft-capping (refused if
set), optional final soft-capping (Gemma3ForCausalLM only: HF's ConditionalGeneration head
skips it), sliding layers with their own rope base (rope_freq_base_swa, no scaling:
llama.cpp fixes the sliding layers' scale to 1) and the global layers' rope scaling (linear for 4B+).
"""
from __future__ import annotations

import gguf
import numpy as np

from ..errors import InputError
from .base import HD
from .gemma2 import GemmaBase

_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class Gemma3Family(GemmaBase):
    arch = "gemma3"
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    big_layer_count = 62
    rope_types = ("default", "linear")
    skip_prefixes = _VISION

    def hf_text_name(self, hf_name: str) -> str | None:
        if hf_name.startswith(_VISION):
            return None
        for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
            if hf_name.startswith(old):
                return new + hf_name[len(old):]
        return super().hf_text_name(hf_name)

    def layer_tensors(self) -> dict[str, tuple[str, ...]]:
        return {**super().layer_tensors(), "self_attn.q_norm.weight": (HD,), "self_attn.k_norm.weight": (HD,)}

    def check(self) -> None:
        self.check_no_attention_bias()
        if self.c.get("attn_logit_softcapping"):
            raise InputError("Gemma3 config sets attn_logit_softcapping, which llama.cpp's gemma3 does not apply")
        local = self.rope("sliding_attention")
        if "sliding_attention" in self.layer_types() and local.get("rope_type", "default") != "default":
            raise InputError(f"Gemma3 sliding layers use rope_type {local['rope_type']!r}; llama.cpp only "
                             "scales the global layers' rope")

    def transform(self, name: str, x: np.ndarray) -> np.ndarray:
        x = self.norm_shifted(name, x)
        if name.endswith("attn_q_norm.weight") and (c := self.query_scale()) != 1.0:
            x = x * np.float32(c)
        return x

    def add_arch_metadata(self, w: gguf.GGUFWriter) -> None:
        # transformers' Gemma3ForConditionalGeneration never soft-caps its logits (only Gemma3ForCausalLM does)
        if self.c.get("final_logit_softcapping") and self.model.architecture == "Gemma3ForCausalLM":
            w.add_final_logit_softcapping(float(self.c.get("final_logit_softcapping")))
        if "sliding_attention" in self.layer_types():
            self.add_swa(w)
            w.add_rope_freq_base_swa(float(self.rope("sliding_attention").get("rope_theta", 10000.0)))
