"""Greedy generation for evaluation: GGUF files in the pinned llama.cpp (child process), HF directories in
transformers (the full-precision reference).

    generate_gguf(path, prompts)   batched continuous generation, chat template from the GGUF, argmax, KV cache
    generate_hf(model_dir, prompts) left-padded batches, tokenizer's chat template, argmax
    score_gguf / score_hf          next-token log-probabilities of candidate answers (the model-as-judge)
    greedy_hf(model, pad_id, seqs)  the one HF greedy loop (generate_hf and tools/testbed/testbed_common.py use it)

Each prompt becomes a single user turn, after the given system message (`eval --system`) or else the chat
template's own default system prompt if it has one (SmolLM2 and Qwen2.5 templates do) -- exactly what llama-server / llama-cli (jinja on by default) and
transformers' apply_chat_template produce, so GGUF and HF runs see the same tokens.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from ..chat import chat_ids, per_prompt
from ..llamacpp import LlamaBuild, call

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    sys.stderr.write(f"\r{line}\033[K" if sys.stderr.isatty() else line + "\n")
    sys.stderr.flush()


def _end_progress(progress: Progress | None) -> None:
    if progress is stderr_progress and sys.stderr.isatty():
        sys.stderr.write("\n")


def _texts(prompts: Sequence) -> list[str]:  # noqa: ANN001 - str or prompts.Prompt
    return [p if isinstance(p, str) else p.text for p in prompts]


def _run_gguf(op: str, path: str | Path, fields: dict, build: LlamaBuild | None, progress: Progress | None) -> dict:
    try:
        return call(op, path, fields, build, progress)
    finally:
        _end_progress(progress)


def generate_gguf(path: str | Path, prompts: Sequence, max_new_tokens: int = 128, n_parallel: int = 8,
                  threads: int = 0, *, template: str = "jinja", system: str | Sequence[str | None] | None = None,
                  build: LlamaBuild | None = None,
                  progress: Progress | None = stderr_progress, stats: dict | None = None) -> list[str]:
    """Greedy answers of a GGUF model to each prompt (one user turn each), n_parallel sequences per batch.

    threads=0: all cores this process may use (llama.cpp's own default is 4). template: "jinja" (the GGUF's
    template rendered like llama.cpp's default chat path) or "builtin" (llama_chat_apply_template). system: a
    system message before each user turn, or one per prompt (None: the template's default; chat.chat_messages). If `stats` is a dict
    it receives the generated token ids ("tokens") and timing ("seconds", "generated_tokens", "prompt_tokens",
    "n_parallel").
    """
    texts = _texts(prompts)
    if not texts:
        return []
    fields = {"prompts": texts, "max_new_tokens": int(max_new_tokens), "n_parallel": int(n_parallel),
              "threads": int(threads), "template": template}
    systems = per_prompt(system, len(texts))
    if any(s is not None for s in systems):
        fields["systems"] = systems
    res = _run_gguf("generate", path, fields, build, progress)
    if stats is not None:
        stats.update(res["stats"], tokens=res["tokens"])
    return res["texts"]


def score_gguf(path: str | Path, prompts: Sequence[str], candidates: dict[str, list[str]], n_parallel: int = 8,
               threads: int = 0, *, build: LlamaBuild | None = None,
               progress: Progress | None = stderr_progress) -> list[dict[str, float]]:
    """For each chat prompt, log P(first token of any of candidates[name]) at the assistant's first position."""
    if not prompts:
        return []
    res = _run_gguf("score", path, {"prompts": list(prompts), "candidates": candidates,
                                    "n_parallel": int(n_parallel), "threads": int(threads)}, build, progress)
    return res["scores"]


def gguf_info(path: str | Path, *, build: LlamaBuild | None = None) -> dict:
    """Load the file in llama.cpp (child process) and report whether it carries a chat template."""
    return call("info", path, {}, build)


# -- transformers (HF directories) ----------------------------------------------------------------
def load_hf_tokenizer(model_dir: str | Path):  # noqa: ANN201 - HF tokenizer, padding on the left for generation
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_hf_model(model_dir: str | Path, gguf_file: str | None = None):  # noqa: ANN201 - torch module
    """float32, eval mode; gguf_file: a GGUF file in model_dir, dequantized by transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kw).eval()


def _left_pad(pad_id: int, seqs: list[list[int]]):  # noqa: ANN202 - (ids, mask) tensors
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids, mask


def greedy_hf(model, pad_id: int, seqs: list[list[int]], max_new_tokens: int, batch_size: int, eos_ids: set[int],
              *, progress: Progress | None = None) -> list[list[int]]:  # noqa: ANN001 - HF causal LM
    """Greedy continuation of each token sequence, batch_size at a time in the given order, left-padded.

    Each answer is cut just AFTER its first end-of-generation token (kept, so callers can train on it); an answer
    without one ran out of max_new_tokens."""
    import time

    import torch

    out: list[list[int]] = []
    n_gen, t0 = 0, time.perf_counter()
    for start in range(0, len(seqs), batch_size):
        ids, mask = _left_pad(pad_id, seqs[start:start + batch_size])
        with torch.no_grad():  # temperature/top_p/top_k=None: greedy, without warnings about the model's sampling
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                                 eos_token_id=sorted(eos_ids))
        for row in gen[:, ids.shape[1]:].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
            out.append(row[:cut])
            n_gen += cut
        if progress is not None:
            dt = time.perf_counter() - t0
            progress(f"generate (transformers) {len(out)}/{len(seqs)} prompts, {n_gen} tokens, {n_gen / dt:.1f} tok/s")
    return out


def generate_hf(model_dir: str | Path, prompts: Sequence, max_new_tokens: int = 128, batch_size: int = 8,
                threads: int = 0, *, system: str | Sequence[str | None] | None = None,
                progress: Progress | None = stderr_progress,
                stats: dict | None = None) -> list[str]:
    """Greedy answers from a Hugging Face model directory (float32, left-padded batches, chat template)."""
    import time

    import torch

    texts = _texts(prompts)
    if not texts:
        return []
    if threads > 0:
        torch.set_num_threads(threads)
    tok, model = load_hf_tokenizer(model_dir), load_hf_model(model_dir)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tok.eos_token_id])
    t0 = time.perf_counter()
    seqs = [chat_ids(tok, t, system=s) for t, s in zip(texts, per_prompt(system, len(texts)))]
    try:
        rows = greedy_hf(model, tok.pad_token_id, seqs, max_new_tokens, batch_size, eos_ids, progress=progress)
    finally:
        _end_progress(progress)
    tokens = [r[:-1] if r and r[-1] in eos_ids else r for r in rows]  # the answer proper: no end token
    if stats is not None:
        stats.update(seconds=time.perf_counter() - t0, generated_tokens=sum(map(len, tokens)), tokens=tokens,
                     n_parallel=batch_size)
    return [tok.decode(t, skip_special_tokens=True) for t in tokens]


def score_hf(model_dir: str | Path, prompts: Sequence[str], candidates: dict[str, list[str]], batch_size: int = 8,
             *, progress: Progress | None = stderr_progress) -> list[dict[str, float]]:
    """score_gguf for a Hugging Face directory."""
    import torch

    if not prompts:
        return []
    tok, model = load_hf_tokenizer(model_dir), load_hf_model(model_dir)
    cand = {name: sorted({tok(w, add_special_tokens=False)["input_ids"][0] for w in words
                          if tok(w, add_special_tokens=False)["input_ids"]}) for name, words in candidates.items()}
    ids_all = [chat_ids(tok, p) for p in prompts]
    out: list[dict[str, float]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(tok.pad_token_id, ids_all[start:start + batch_size])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].double()
        lp = torch.log_softmax(logits, -1)
        for r in range(lp.shape[0]):
            out.append({name: float(torch.logsumexp(lp[r, c], 0)) if c else float("-inf") for name, c in cand.items()})
        if progress is not None:
            progress(f"judge (transformers) {len(out)}/{len(prompts)} prompts")
    _end_progress(progress)
    return out
