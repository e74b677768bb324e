"""Model families: which HF architectures convert, and how (one file per family)."""
from __future__ import annotations

from ..errors import InputError
from ..hf_model import HFModel, show
from .base import ModelFamily
from .gemma2 import Gemma2Family
from .gemma3 import Gemma3Family
from .llama import LlamaFamily
from .qwen2 import Qwen2Family

FAMILIES: tuple[type[ModelFamily], ...] = (LlamaFamily, Qwen2Family, Gemma2Family, Gemma3Family)
BY_ARCHITECTURE: dict[str, type[ModelFamily]] = {a: f for f in FAMILIES for a in f.hf_architectures}


def supported_architectures() -> list[str]:
    return list(BY_ARCHITECTURE)


def family_for(model: HFModel) -> ModelFamily:
    archs = model.config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InputError(f"config.json: architectures is {show(repr(archs))}; it must be a list of class names such as "
                         '["LlamaForCausalLM"]')
    for a in archs:
        if a in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[a](model)
    found = ", ".join(archs) if archs else f"none (model_type {model.config.get('model_type', '?')!r})"
    raise InputError(f"unsupported architecture {found}; supported: {', '.join(BY_ARCHITECTURE)}")
