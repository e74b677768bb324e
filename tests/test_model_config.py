"""models/config.py against transformers' AutoConfig: every value a family reads, for each family's test config,
the real SmolLM2 config and the config spellings transformers 4.x wrote (rope_scaling, rope_theta, Gemma 3's
rope_local_base_freq and sliding_window_pattern, no layer_types) -- plain conversion no longer asks transformers,
so this is where its defaults are checked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qrealign_gguf.errors import InputError
from qrealign_gguf.models.config import read_text_config

from test_families import CASES, _config
from tiny_models import smollm2_dir

DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration"}
# config.json as older transformers (or hand-written hub configs) spell it: few keys, legacy rope keys
LEGACY = {
    "llama-4x-llama3-rope": {"model_type": "llama", **DIMS, "vocab_size": 500, "rope_theta": 500000.0,
                             "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "llama-4x-type-key-yarn": {"model_type": "llama", **DIMS, "vocab_size": 500, "max_position_embeddings": 4096,
                               "rope_scaling": {"type": "yarn", "factor": 4.0}},
    "mistral-defaults": {"model_type": "mistral", **DIMS, "vocab_size": 500},
    "qwen2-sliding": {"model_type": "qwen2", **DIMS, "vocab_size": 500, "use_sliding_window": True,
                      "sliding_window": 64, "max_window_layers": 2, "rope_theta": 1e6},
    "qwen2-head-dim-extra": {"model_type": "qwen2", **DIMS, "vocab_size": 500, "head_dim": 32},
    "gemma2-4x": {"model_type": "gemma2", **DIMS, "vocab_size": 500, "head_dim": 64, "rope_theta": 10000.0,
                  "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3-4x": {"model_type": "gemma3_text", **DIMS, "num_hidden_layers": 7, "vocab_size": 500, "head_dim": 64,
                  "rope_theta": 1e6, "rope_local_base_freq": 10000.0, "sliding_window_pattern": 3,
                  "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "gemma3-bidirectional": {"model_type": "gemma3_text", **DIMS, "vocab_size": 500, "sliding_window": 512,
                             "use_bidirectional_attention": True},
    "gemma3-vlm-sparse-text": {"model_type": "gemma3", "text_config": {"hidden_size": 256, "num_hidden_layers": 2}},
    "gemma3-vlm-untied": {"model_type": "gemma3", "tie_word_embeddings": False,
                          "text_config": {"model_type": "gemma3_text", **DIMS}},
}
KEYS = ("sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
        "attention_bias", "mlp_bias", "use_sliding_window")


def _reference(cfg) -> dict[str, Any]:  # noqa: ANN001 - a transformers PreTrainedConfig
    """What the converter read from transformers' resolved config before models/config.py existed."""
    c = cfg.get_text_config()
    top = getattr(cfg, "tie_word_embeddings", None)
    heads = c.num_attention_heads
    layer_types = list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)

    def rope(kind: str) -> dict:
        rp = getattr(c, "rope_parameters", None)
        if "full_attention" in rp or "sliding_attention" in rp:
            rp = rp.get(kind) or rp.get("full_attention") or {}
        return {"rope_type": "default", **rp}
    return {"num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_attention_heads": heads,
            "num_key_value_heads": getattr(c, "num_key_value_heads", None) or heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads, "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
            "tie": bool(top if top is not None else getattr(c, "tie_word_embeddings", False)),
            "activation": getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None),
            "layer_types": layer_types, **{f"rope:{k}": rope(k) for k in sorted(set(layer_types))},
            **{k: getattr(c, k, None) for k in KEYS}}


def _ours(config: dict) -> dict[str, Any]:
    t = read_text_config(config)
    return {"num_hidden_layers": t.num_hidden_layers, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "tie": t.tie_word_embeddings, "activation": t.activation, "layer_types": t.layer_types,
            **{f"rope:{k}": t.rope.get(k) or t.rope["full_attention"] for k in sorted(set(t.layer_types))},
            **{k: t.values.get(k) for k in KEYS}}


def _compare(config: dict, tmp_path: Path) -> None:
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = _reference(AutoConfig.from_pretrained(tmp_path, local_files_only=True))
    assert _ours(config) == ref


@pytest.mark.parametrize("case", CASES)
def test_family_test_configs(case, tmp_path):
    cfg = _config(case, 400)
    cfg.save_pretrained(tmp_path)  # the config.json save_pretrained writes, as the family tests convert it
    _compare(json.loads((tmp_path / "config.json").read_text()), tmp_path)


def test_smollm2_config(tmp_path):
    _compare(json.loads((smollm2_dir() / "config.json").read_text()), tmp_path)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_and_sparse_configs(name, tmp_path):
    cfg = LEGACY[name]
    arch = ARCH[cfg["model_type"]]
    _compare({**cfg, "architectures": [arch]}, tmp_path)


@pytest.mark.parametrize("config, match", [
    ({"model_type": "qwen3", **DIMS}, "model_type 'qwen3'"),
    ({"architectures": ["LlamaForCausalLM"], **DIMS}, "model_type None"),
    ({"model_type": "llama", **DIMS, "rope_scaling": {"rope_type": "linear"}}, "needs factor"),
    ({"model_type": "llama", **DIMS, "num_attention_heads": 3, "head_dim": 64}, "not a multiple"),
])
def test_refused(config, match):
    """Configs transformers refuses (or that we have no defaults for) are refused, in one line."""
    with pytest.raises(InputError, match=match) as e:
        read_text_config(config)
    assert "\n" not in str(e.value)
