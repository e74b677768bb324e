"""config.json -> the text model's hyperparameters, with the defaults transformers' config classes fill in.

Plain conversion reads the config itself instead of through transformers' AutoConfig, which imports torch
(~330 MiB and seconds of start-up for a job that needs neither). The facts below are those of the installed
transformers (5.x) config classes LlamaConfig, MistralConfig, Qwen2Config, Gemma2Config, Gemma3TextConfig and
Gemma3Config (text_config); tests/test_model_config.py checks every resolved value against AutoConfig.

Both rope spellings are read: transformers 4.x (rope_theta + rope_scaling, Gemma 3's rope_local_base_freq) and
5.x (rope_parameters, flat or per layer type). The result is one rope dict per attention kind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..hf_model import show

# class defaults of the keys the families read, per model_type (from transformers' configuration_*.py)
_COMMON = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
               num_key_value_heads=None, head_dim=None, layer_types=None, sliding_window=None)
_GEMMA = dict(_COMMON, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", hidden_act=None,
              tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096, attention_bias=False)
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, attention_bias=False, mlp_bias=False),
    "mistral": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    sliding_window=4096),
    "qwen2": dict(_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "gemma2": dict(_GEMMA, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, max_position_embeddings=8192, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(_GEMMA, vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, max_position_embeddings=131_072, final_logit_softcapping=None,
                        attn_logit_softcapping=None, use_bidirectional_attention=False),
}
WRAPPERS = {"gemma3": ("gemma3_text", True)}  # multimodal model_type -> (text model_type, its tie_word_embeddings)
# transformers refuses hidden_size % num_attention_heads != 0 for these even when head_dim is given
_DIVISIBLE_HEADS = ("llama", "gemma2", "gemma3_text")
# required keys per rope_type (transformers raises KeyError without them)
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
                  "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}
_LEGACY_LAYER_TYPES = {"attention": "full_attention"}


@dataclass(frozen=True)
class TextConfig:
    """The language model's hyperparameters, defaults filled in (names as in transformers)."""
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    activation: str | None  # hidden_activation (gemma), else hidden_act
    layer_types: list[str]
    rope: dict[str, dict[str, Any]]  # "full_attention" / "sliding_attention" -> rope_type, rope_theta, factor, ...
    values: dict[str, Any]  # config.json's text part over the class defaults: every other key

    def get(self, key: str, default: Any = None) -> Any:
        """Any other key (sliding_window, attention_bias, query_pre_attn_scalar, ...), None when null."""
        v = self.values.get(key)
        return default if v is None else v


def read_text_config(config: dict[str, Any]) -> TextConfig:
    """config.json's text model as transformers would resolve it; InputError for a model_type we have no
    defaults for (they would be guesses)."""
    top_type = config.get("model_type")
    text_type, wrapper_tie = WRAPPERS.get(top_type, (top_type, None))
    if text_type not in DEFAULTS:
        raise InputError(f"config.json: model_type {show(repr(top_type))} is not one of "
                         f"{', '.join(sorted([*DEFAULTS, *WRAPPERS]))}; the converter knows the defaults of these only")
    nested = config.get("text_config")
    raw = nested if isinstance(nested, dict) else {} if top_type in WRAPPERS else config
    v = {**DEFAULTS[text_type], **raw}
    heads, hidden = v["num_attention_heads"], v["hidden_size"]
    if text_type in _DIVISIBLE_HEADS and _ints(hidden, heads) and hidden % heads:
        raise InputError(f"config.json: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                         f"(transformers refuses this {text_type} config)")
    head_dim = v.get("head_dim") or (hidden // heads if _ints(hidden, heads) else None)
    kv = v.get("num_key_value_heads") or heads
    if text_type == "qwen2" and not v.get("use_sliding_window"):
        v["sliding_window"] = None
    if text_type == "gemma3_text" and v.get("use_bidirectional_attention") and _ints(v.get("sliding_window")):
        v["sliding_window"] = v["sliding_window"] // 2 + 1
    v["layer_types"] = layer_types = _layer_types(text_type, v)
    top_tie = config.get("tie_word_embeddings", wrapper_tie) if top_type in WRAPPERS else None
    return TextConfig(
        model_type=text_type, num_hidden_layers=v["num_hidden_layers"], hidden_size=hidden,
        intermediate_size=v["intermediate_size"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, vocab_size=v["vocab_size"], max_position_embeddings=v["max_position_embeddings"],
        rms_norm_eps=v["rms_norm_eps"],
        tie_word_embeddings=bool(top_tie if top_tie is not None else v.get("tie_word_embeddings")),
        activation=v.get("hidden_activation") or v.get("hidden_act"), layer_types=layer_types,
        rope=_rope(text_type, v, raw), values=v)


def _ints(*xs: Any) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in xs)


def _layer_types(text_type: str, v: dict[str, Any]) -> list[str]:
    given = v.get("layer_types")
    if isinstance(given, list):
        return [_LEGACY_LAYER_TYPES.get(t, t) if isinstance(t, str) else t for t in given]
    n = v["num_hidden_layers"]
    if not _ints(n):  # check_resolved refuses it with its own message
        return []
    if text_type == "qwen2":
        window, first = v.get("sliding_window"), v.get("max_window_layers")
        return ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    if text_type == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if text_type == "gemma3_text":  # the pre-5 integer pattern: every Nth layer is global
        pattern = v.get("sliding_window_pattern", 6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    return ["full_attention"] * n  # llama/mistral: no per-layer attention kinds


def _rope(text_type: str, v: dict[str, Any], raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rope settings per attention kind, as transformers 5 standardizes them."""
    scaling, params = raw.get("rope_scaling"), raw.get("rope_parameters")
    if text_type == "gemma3_text":
        per_kind = {k: dict(x) for k, x in (params or {}).items() if isinstance(x, dict)}
        full = per_kind.setdefault("full_attention", {"rope_type": "default"})
        if isinstance(scaling, dict):
            full.update(scaling)
        full.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
        local = per_kind.setdefault("sliding_attention", {"rope_type": "default"})
        local.setdefault("rope_theta", raw.get("rope_local_base_freq", 10_000.0))
    else:
        given = scaling or params or {}
        given = given if isinstance(given, dict) else {}
        # llama/mistral have no layer_types field, so transformers never reads their rope settings per kind
        kinds = set(v["layer_types"]) if text_type not in ("llama", "mistral") else set()
        nested = [k for k in given if k in kinds]
        per_kind = {k: dict(given[k]) for k in nested if isinstance(given[k], dict)} if nested else {
            "full_attention": dict(given)}
        for p in per_kind.values():
            p.setdefault("rope_theta", raw.get("rope_theta", 10_000.0))
            if raw.get("partial_rotary_factor") is not None:
                p.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    for kind, p in per_kind.items():
        p.setdefault("rope_type", p.get("type", "default"))
        if p["rope_type"] in ("llama3", "yarn", "longrope"):
            p.setdefault("original_max_position_embeddings", v["max_position_embeddings"])
        missing = [k for k in _ROPE_REQUIRED.get(p["rope_type"], ()) if k not in p]
        if missing:
            raise InputError(f"config.json: rope_type {show(repr(p['rope_type']))} of {kind} layers needs "
                             f"{', '.join(missing)}")
    return per_kind
