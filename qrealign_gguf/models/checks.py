"""What a model folder's config.json claims, checked before transformers or the converter act on it.

The raw values are checked first (before transformers reads the file: a Gemma 3 config with num_hidden_layers
1e9 makes transformers build a billion-entry layer_types list), then the values as transformers resolved them.
Shapes are checked against the tensors later, in DecoderFamily._plan.

Presence: at the top level of config.json, save_pretrained writes every model-specific key, so a missing
shape key means a hand-edited or broken file, and transformers' defaults (Llama-2-7B's 32 layers, ...) would
describe another model. Inside a nested text_config (Gemma 3's multimodal wrapper) save_pretrained writes only
the values that differ from the class defaults, so there the defaults are the real values and may be absent.
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import InputError
from ..hf_model import show

# keys that fix tensor shapes: must be written in config.json when the text model is its top level
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# positive integers where given (null means "use the default" or "off")
INT_KEYS = (*SHAPE_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
# positive finite numbers where given
FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
              "attn_logit_softcapping", "final_logit_softcapping")
ROPE_INT_KEYS = ("original_max_position_embeddings",)
ROPE_FLOAT_KEYS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "extrapolation_factor",
                   "attention_factor", "attn_factor", "beta_fast", "beta_slow")
UINT32 = 2**32  # GGUF stores these hparams as uint32


def is_positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < UINT32


def is_positive_float(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_raw_config(config: dict[str, Any], text: dict[str, Any], n_tensors: int) -> None:
    """config.json as written: types and ranges of every hparam we read, and presence of the shape keys.
    `text` is the language model's part (config itself, or its text_config)."""
    where = "config.json" if text is config else "config.json text_config"
    if text is config:
        missing = [k for k in SHAPE_KEYS if config.get(k) is None]
        if missing:
            raise InputError(f"config.json has no {', '.join(missing)}; the converter would have to guess "
                             "(transformers' defaults describe another model): restore config.json from the model's source")
    for k in INT_KEYS:
        if text.get(k) is not None and not is_positive_int(text[k]):
            raise InputError(f"{where}: {k} is {show(repr(text[k]))}; it must be a positive integer below 2^32")
    for k in FLOAT_KEYS:
        if text.get(k) is not None and not is_positive_float(text[k]):
            raise InputError(f"{where}: {k} is {show(repr(text[k]))}; it must be a positive finite number")
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise InputError(f"{where}: {key} is {show(repr(rope))}; it must be an object")
        per_kind = [v for v in rope.values() if isinstance(v, dict)]  # {"full_attention": {...}, ...} or flat
        for params in per_kind or [rope]:
            check_rope(params, f"{where} {key}")
    n_layers = text.get("num_hidden_layers")
    if isinstance(n_layers, int) and n_layers > n_tensors:  # bounds every per-layer loop that follows
        raise InputError(f"{where} says num_hidden_layers={n_layers}, but the checkpoint holds only {n_tensors} "
                         "tensors; config.json does not belong to these weights")


def check_rope(rope: dict[str, Any], where: str) -> None:
    for k in ROPE_INT_KEYS:
        if rope.get(k) is not None and not is_positive_int(rope[k]):
            raise InputError(f"{where}: {k} is {show(repr(rope[k]))}; it must be a positive integer")
    for k in ROPE_FLOAT_KEYS:
        if rope.get(k) is not None and not is_positive_float(rope[k]):
            raise InputError(f"{where}: {k} is {show(repr(rope[k]))}; it must be a positive finite number")
    if rope.get("rope_type", rope.get("type")) == "llama3":
        lo, hi = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        if not lo < hi:
            raise InputError(f"{where}: llama3 rope needs low_freq_factor < high_freq_factor (got {lo} and {hi})")


def check_resolved(arch: str, *, n_layers: int, n_embd: int, n_head: int, n_head_kv: int, head_dim: int,
                   head_dim_given: bool, n_ff: int, vocab: int, n_ctx: int, eps: float, layer_types: list[str]) -> None:
    """The hparams as transformers resolved them (defaults filled in): ranges and consistency."""
    values = {"num_hidden_layers": n_layers, "hidden_size": n_embd, "num_attention_heads": n_head,
              "num_key_value_heads": n_head_kv, "head_dim": head_dim, "intermediate_size": n_ff,
              "vocab_size": vocab, "max_position_embeddings": n_ctx}
    for k, v in values.items():
        if not is_positive_int(v):
            raise InputError(f"config.json: {k} resolves to {show(repr(v))}; it must be a positive integer")
    if not is_positive_float(eps):
        raise InputError(f"config.json: rms_norm_eps resolves to {show(repr(eps))}; it must be a positive finite number")
    if not head_dim_given and n_embd % n_head:
        raise InputError(f"config.json: hidden_size={n_embd} is not a multiple of num_attention_heads={n_head} and "
                         "head_dim is not given; the head size is undefined")
    if n_head % n_head_kv:
        raise InputError(f"config.json: num_attention_heads={n_head} is not a multiple of "
                         f"num_key_value_heads={n_head_kv}")
    if head_dim % 2:
        raise InputError(f"config.json: head_dim={head_dim} is odd; rotary embeddings rotate pairs, so llama.cpp's "
                         f"{arch} needs an even head size")
    if len(layer_types) != n_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
        raise InputError(f"config.json: layer_types must list full_attention/sliding_attention once per layer "
                         f"({n_layers}); it has {len(layer_types)} entries")
