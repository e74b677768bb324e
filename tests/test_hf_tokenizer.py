"""hf_tokenizer.HFTokenizer (tokenizer.json read with the `tokenizers` package) against transformers' AutoTokenizer:
the added tokens, the special token ids and the ids of texts with and without special tokens -- everything
build_vocab takes from the HF tokenizer -- on each family's test tokenizer, SmolLM2's, and variants of the rules
transformers applies on top of tokenizer.json."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from qrealign_gguf.hf_tokenizer import KINDS, HFTokenizer, load_tokenizer
from qrealign_gguf.tokenizer import CHECK_TEXT

from test_families import TEXTS, bpe_tokenizer, smollm2_tokenizer, spm_tokenizer

BASES: dict[str, tuple[Callable[[Path], object], str]] = {  # name -> (builder, config.json model_type)
    "smollm2": (smollm2_tokenizer, "llama"),
    "llama-bpe": (lambda d: bpe_tokenizer(d, "llama-bpe"), "llama"),
    "qwen2": (lambda d: bpe_tokenizer(d, "qwen2"), "qwen2"),
    "gemma-spm": (lambda d: spm_tokenizer(d, "gemma", keep_model=True), "gemma2"),
    "gemma-json": (lambda d: spm_tokenizer(d, "gemma", keep_model=False), "gemma3_text"),
    "llama-spm": (lambda d: spm_tokenizer(d, "llama", keep_model=True), "mistral"),
}


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


VARIANTS: dict[str, tuple[str, Callable[[Path], None]]] = {  # name -> (base, edit of the folder)
    "qwen2-no-config": ("qwen2", lambda d: (d / "config.json").unlink()),
    "llama-bpe-add-eos": ("llama-bpe", lambda d: _edit_json(d / "tokenizer_config.json",
                                                             lambda c: c.update(add_bos_token=True, add_eos_token=True))),
    "llama-bpe-no-bos": ("llama-bpe", lambda d: _edit_json(d / "tokenizer_config.json",
                                                            lambda c: c.update(add_bos_token=False))),
    "smollm2-no-post-processor": ("smollm2", lambda d: _edit_json(d / "tokenizer.json",
                                                                   lambda t: t.update(post_processor=None))),
    "smollm2-no-post-processor-flags": ("smollm2", lambda d: (
        _edit_json(d / "tokenizer.json", lambda t: t.update(post_processor=None)),
        _edit_json(d / "tokenizer_config.json", lambda c: c.update(add_bos_token=True, add_eos_token=True)))),
    "smollm2-new-special": ("smollm2", lambda d: _edit_json(d / "tokenizer_config.json",
                                                             lambda c: c.update(sep_token="<|sep|>",
                                                                                extra_special_tokens=["<|x|>"]))),
    "gemma-json-no-post-processor-flags": ("gemma-json", lambda d: (
        _edit_json(d / "tokenizer.json", lambda t: t.update(post_processor=None)),
        _edit_json(d / "tokenizer_config.json", lambda c: c.update(add_bos_token=True, add_eos_token=True)))),
    "gemma-json-dict-tokens": ("gemma-json", lambda d: _edit_json(d / "tokenizer_config.json", lambda c: c.update(
        bos_token={"__type": "AddedToken", "content": "<bos>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        pad_token=None))),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for name, (build, model_type) in BASES.items():
        build(root / name)
        (root / name / "config.json").write_text(json.dumps({"model_type": model_type}))
        out[name] = root / name
    return out


def _facts(tok) -> dict:  # noqa: ANN001 - HFTokenizer or a transformers tokenizer
    if isinstance(tok, HFTokenizer):
        ids = {k: tok.token_id(k) for k in KINDS}
    else:
        ids = {k: getattr(tok, f"{k}_token_id", None) for k in KINDS}
    texts = [CHECK_TEXT, "a", *TEXTS]
    return {"added": {i: (t.content, bool(t.special)) for i, t in tok.added_tokens_decoder.items()}, "ids": ids,
            "with": [list(tok.encode(t)) for t in texts],
            "without": [list(tok.encode(t, add_special_tokens=False)) for t in texts]}


def _check(folder: Path) -> None:
    from transformers import AutoTokenizer

    ours = load_tokenizer(folder)
    assert isinstance(ours, HFTokenizer)
    assert _facts(ours) == _facts(AutoTokenizer.from_pretrained(folder, local_files_only=True))


@pytest.mark.parametrize("name", BASES)
def test_same_as_transformers(bases, name):
    _check(bases[name])


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_same_as_transformers(bases, name, tmp_path):
    base, edit = VARIANTS[name]
    d = tmp_path / name
    shutil.copytree(bases[base], d)
    edit(d)
    _check(d)
