"""A prompt as the model sees it at inference: the one chat-tokenization rule every HF-side step uses
(imatrix from --calib, probes, realignment, HF generation), so they all see the same tokens llama.cpp does."""
from __future__ import annotations


def chat_ids(tok, text: str, max_tokens: int | None = None) -> list[int]:  # noqa: ANN001 - HF tokenizer
    """User turn + generation prompt (the assistant header) as token ids; plain text without a chat template.

    Too long a prompt keeps its END: the last id is the "last prompt token" whose state decides refusal vs
    compliance, and the generation prompt must stay in place for the next token to be an answer."""
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tok(text)["input_ids"]
    ids = list(ids)
    return ids if max_tokens is None else ids[-max_tokens:]
