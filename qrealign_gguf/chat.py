"""A prompt as the model sees it at inference: the one chat-tokenization rule every HF-side step uses
(imatrix from --calib, probes, realignment, HF generation), so they all see the same tokens llama.cpp does."""
from __future__ import annotations

from collections.abc import Callable, Sequence


def chat_messages(text: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, after `system` as the system message when given; None leaves the template's own default
    (Qwen2.5's and SmolLM2's templates add one), "" is an empty system message."""
    user = [{"role": "user", "content": text}]
    return user if system is None else [{"role": "system", "content": system}, *user]


def per_prompt(system: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    """One system message (or None: the template's default) for each of n prompts; one string serves them all."""
    if system is None or isinstance(system, str):
        return [system] * n
    if len(system) != n:
        raise ValueError(f"{len(system)} system messages for {n} prompts")
    return list(system)


def chat_ids(tok, text: str, max_tokens: int | None = None,  # noqa: ANN001 - HF tokenizer
             system: str | None = None) -> list[int]:
    """User turn (after `system`, see chat_messages) + generation prompt (the assistant header) as token ids;
    plain text without a chat template (where a system message is an error: there is nowhere to put it).

    Too long a prompt keeps its END: the last id is the "last prompt token" whose state decides refusal vs
    compliance, and the generation prompt must stay in place for the next token to be an answer. Under a system
    message the message stays too, and the start of the user text goes."""
    from .errors import InputError

    if getattr(tok, "chat_template", None):
        if system is not None:
            check_system_shown(lambda m: tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False), system)
        ids = tok.apply_chat_template(chat_messages(text, system), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
    elif system is not None:
        raise InputError("a prompt has a system message, but this model's tokenizer has no chat template to put it in")
    else:
        ids = tok(text)["input_ids"]
    ids = list(ids)
    if system and max_tokens is not None and len(ids) > max_tokens:
        return _cut_keeping_system(tok, text, system, max_tokens, len(ids))
    return ids if max_tokens is None else ids[-max_tokens:]


def _cut_keeping_system(tok, text: str, system: str, max_tokens: int, n: int) -> list[int]:  # noqa: ANN001
    """A prompt asked under a system message that is too long: the END of the user text goes, as for any long
    prompt, but the message stays (cutting the front would drop it unseen)."""
    from .errors import InputError

    words = tok(text, add_special_tokens=False)["input_ids"]
    drop = n - max_tokens
    while drop < len(words):
        ids = chat_ids(tok, tok.decode(words[drop:]), None, system)
        if len(ids) <= max_tokens:  # re-tokenizing the cut text can shift a token or two: check, then cut more
            return ids
        drop += len(ids) - max_tokens
    raise InputError(f"the system message {system[:40]!r} alone is over the limit of {max_tokens} prompt tokens")


def check_system_shown(render: Callable[[list[dict[str, str]]], str], system: str) -> None:
    """InputError when a chat template (render: messages -> prompt text) rejects the system role or drops the
    message: asking under a message the model never sees would be a silent no-op."""
    from jinja2.exceptions import TemplateError

    from .errors import InputError

    try:
        text = render(chat_messages("Hello", system))
    except (TemplateError, ValueError, TypeError) as e:
        raise InputError(f"its chat template cannot take a system message ({e})") from None
    if system.strip() and system.strip() not in text:
        raise InputError(f"its chat template drops the system message {system[:40]!r}")
