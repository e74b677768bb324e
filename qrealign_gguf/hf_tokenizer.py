"""A Hugging Face tokenizer folder read with the `tokenizers` package, as transformers' AutoTokenizer reads it.

build_vocab needs three facts from the HF tokenizer: its added tokens (with their special flag), the ids of the
named special tokens, and the ids it produces for a text (pre-tokenizer hash, BOS/EOS added). transformers
imports torch for AutoTokenizer (~330 MiB, seconds of start-up), so plain conversion reads tokenizer.json itself
and applies transformers' (5.x) rules on top of it:
  * named special tokens (bos/eos/unk/pad/sep/cls/mask_token) come from tokenizer_config.json, else
    special_tokens_map.json, else the defaults of the tokenizer class AutoTokenizer picks for the model_type;
  * named and extra special tokens the vocabulary lacks are added as special tokens (new ids at the end);
  * BOS/EOS are added as tokenizer.json's post-processor says: transformers 5 ignores tokenizer_config.json's
    add_bos_token / add_eos_token for these tokenizers (tests/test_hf_tokenizer.py has the cases).
A folder with only tokenizer.model (no tokenizer.json) still goes through transformers, which converts it.
tests/test_hf_tokenizer.py compares every fact with AutoTokenizer on each test tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

KINDS = ("bos", "eos", "unk", "pad", "sep", "cls", "mask")
# defaults of the tokenizer classes AutoTokenizer picks by config.json model_type, whatever tokenizer_class says
_CLASS_DEFAULTS: dict[str, dict[str, str]] = {
    "qwen2": {"unk": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"},  # Qwen2Tokenizer
    "gemma2": {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>", "mask": "<mask>"},  # GemmaTokenizer
}
_CLASS_DEFAULTS["gemma3"] = _CLASS_DEFAULTS["gemma3_text"] = _CLASS_DEFAULTS["gemma2"]


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool


class HFTokenizer:
    """The facts build_vocab reads; one implementation over tokenizer.json (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import AddedToken as TkAddedToken
        from tokenizers import Tokenizer

        tj = path / "tokenizer.json"
        try:
            self._tk = Tokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises plain Exception subclasses with multi-line text
            raise InputError(f"cannot load {tj} ({' '.join(str(e).split())[:200]})") from None
        tc, stm = _json_object(path / "tokenizer_config.json"), _json_object(path / "special_tokens_map.json")
        defaults = _CLASS_DEFAULTS.get(_model_type(path), {})
        self._special: dict[str, str | None] = {}
        for kind in KINDS:
            key = f"{kind}_token"
            value = tc[key] if key in tc else stm[key] if key in stm else defaults.get(kind)
            self._special[kind] = _content(value)
        extra = tc.get("extra_special_tokens") or tc.get("additional_special_tokens") or []
        wanted = [t for t in [*self._special.values(), *map(_content, extra if isinstance(extra, list) else [])] if t]
        missing = [t for t in dict.fromkeys(wanted) if self._tk.token_to_id(t) is None]
        if missing:  # transformers adds them (special) after the vocabulary
            self._tk.add_special_tokens([TkAddedToken(t, special=True, normalized=False) for t in missing])

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return {i: AddedToken(t.content, bool(t.special)) for i, t in self._tk.get_added_tokens_decoder().items()}

    def token_id(self, kind: str) -> int | None:
        text = self._special.get(kind)
        return None if text is None else self._tk.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)


class TransformersTokenizer:
    """The same facts from transformers' AutoTokenizer, for folders without tokenizer.json (it converts
    tokenizer.model); imports transformers and torch."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer
        try:
            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many types here
            raise InputError(f"cannot load the tokenizer in {path} with transformers ({type(e).__name__}: {e}); "
                             "the folder needs tokenizer.json or tokenizer.model with tokenizer_config.json") from None

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return {i: AddedToken(t.content, bool(t.special)) for i, t in self._hf.added_tokens_decoder.items()}

    def token_id(self, kind: str) -> int | None:
        return getattr(self._hf, f"{kind}_token_id", None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))


def load_tokenizer(path: Path) -> HFTokenizer | TransformersTokenizer:
    return HFTokenizer(path) if (path / "tokenizer.json").is_file() else TransformersTokenizer(path)


def _content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json_object(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {p} ({e}); fix or re-export the tokenizer") from None
    return data if isinstance(data, dict) else {}


def _model_type(path: Path) -> str | None:
    cfg = _json_object(path / "config.json")
    text = cfg.get("text_config")
    return cfg.get("model_type") if not isinstance(text, dict) else text.get("model_type", cfg.get("model_type"))
