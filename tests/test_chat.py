"""The one chat-tokenization rule (qrealign_gguf/chat.py) on a real tokenizer and chat template (SmolLM2's)."""
from __future__ import annotations

import pytest

from qrealign_gguf.chat import chat_ids
from tiny_models import smollm2_dir


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir())


def test_same_tokens_as_the_rendered_template(tok):
    """What llama.cpp sees: the template rendered to text, tokenized without extra special tokens."""
    text = "How do I sort a list in Python?"
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert chat_ids(tok, text) == tok(rendered, add_special_tokens=False)["input_ids"]


def test_truncation_keeps_the_generation_prompt_last(tok):
    full = chat_ids(tok, "word " * 300)
    cut = chat_ids(tok, "word " * 300, max_tokens=32)
    assert len(full) > 300 and cut == full[-32:]
    tail = chat_ids(tok, "x")[-4:]  # the end of the user turn + the assistant header
    assert cut[-4:] == tail


def test_system_message_replaces_the_default(tok):
    """None keeps the template's default system prompt (SmolLM2 has one); a message takes its place, "" is an empty
    message, and both render exactly as the template does."""
    from qrealign_gguf.chat import chat_messages

    text, system = "How do I sort a list in Python?", "You answer in rhymes."
    for s in (system, ""):
        rendered = tok.apply_chat_template(chat_messages(text, s), add_generation_prompt=True, tokenize=False)
        assert chat_ids(tok, text, system=s) == tok(rendered, add_special_tokens=False)["input_ids"]
    default = tok.decode(chat_ids(tok, text))
    assert "SmolLM" in default and "SmolLM" not in tok.decode(chat_ids(tok, text, system=system))
    assert system in tok.decode(chat_ids(tok, text, system=system))
    assert chat_ids(tok, text, system="") != chat_ids(tok, text)
