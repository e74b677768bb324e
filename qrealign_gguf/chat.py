"""A prompt as the model sees it at inference: the one chat-tokenization rule every HF-side step uses
(imatrix from --calib, probes, realignment, HF generation), so they all see the same tokens llama.cpp does."""
from __future__ import annotations


def chat_messages(text: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, after `system` as the system message when given; None leaves the template's own default
    (Qwen2.5's and SmolLM2's templates add one), "" is an empty system message."""
    user = [{"role": "user", "content": text}]
    return user if system is None else [{"role": "system", "content": system}, *user]


def chat_ids(tok, text: str, max_tokens: int | None = None,  # noqa: ANN001 - HF tokenizer
             system: str | None = None) -> list[int]:
    """User turn (after `system`, see chat_messages) + generation prompt (the assistant header) as token ids;
    plain text without a chat template (where a system message is an error: there is nowhere to put it).

    Too long a prompt keeps its END: the last id is the "last prompt token" whose state decides refusal vs
    compliance, and the generation prompt must stay in place for the next token to be an answer."""
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(chat_messages(text, system), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
    elif system is not None:
        raise ValueError("a system message needs a chat template; this tokenizer has none")
    else:
        ids = tok(text)["input_ids"]
    ids = list(ids)
    return ids if max_tokens is None else ids[-max_tokens:]
