"""Greedy generation for evaluation: GGUF files in the pinned llama.cpp (child process), HF directories in
transformers (the full-precision reference).

    generate_gguf(path, prompts)   batched continuous generation, chat template from the GGUF, argmax, KV cache
    generate_hf(model_dir, prompts) left-padded batches, tokenizer's chat template, argmax
    score_gguf / score_hf          next-token log-probabilities of candidate answers (the model-as-judge)

Each prompt becomes a single user turn; the chat template adds its own default system prompt if it has one
(SmolLM2 and Qwen2.5 templates do) -- exactly what llama-server / llama-cli (jinja on by default) and
transformers' apply_chat_template produce, so GGUF and HF runs see the same tokens.
"""
from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

from ..chat import chat_ids
from ..llama_runtime import LlamaBuild, find_llama
from ..llama_logits import LlamaCallError
from ._child import PROGRESS_TAG

Progress = Callable[[str], None]


def _stderr_progress(line: str) -> None:
    sys.stderr.write(f"\r{line}\033[K" if sys.stderr.isatty() else line + "\n")
    sys.stderr.flush()


def _texts(prompts: Sequence) -> list[str]:  # noqa: ANN001 - str or prompts.Prompt
    return [p if isinstance(p, str) else p.text for p in prompts]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux): no orphaned llama.cpp runs
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, other platforms
        pass


def _run_child(req: dict, build: LlamaBuild | None, progress: Progress | None) -> dict:
    b = build or find_llama()
    env = b.env()
    env["QREALIGN_LLAMA_BINDING"] = str(b.python_binding)
    # The pinned build uses OpenMP; its default busy-wait at every graph barrier collapses throughput when the
    # cores are shared (measured on a loaded 2-core box: 3.6 -> 11.2 tok/s batched). Same tokens either way.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="qrealign-eval-") as d:
        req = dict(req, out=str(Path(d) / "out.json"))
        proc = subprocess.Popen([sys.executable, "-m", "qrealign_gguf.evaluate._child"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                errors="replace", preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        tail: collections.deque[str] = collections.deque(maxlen=15)

        def pump() -> None:
            for line in proc.stderr:  # type: ignore[union-attr]
                line = line.rstrip("\n")
                if line.startswith(PROGRESS_TAG):
                    if progress is not None:
                        progress(line[len(PROGRESS_TAG):].strip())
                elif line.strip():
                    tail.append(line)

        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.stdin.write(json.dumps(req))  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        reader.join()
        if progress is _stderr_progress and sys.stderr.isatty():
            sys.stderr.write("\n")
        if rc != 0:
            raise LlamaCallError(f"llama.cpp {req['op']} on {req['gguf']} failed (exit {rc}):\n" + "\n".join(tail))
        res = json.loads(Path(req["out"]).read_text(encoding="utf-8"))
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # whole child: load + run (useful on a busy machine)
        res.setdefault("stats", {})["child_cpu_seconds"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        return res


def generate_gguf(path: str | Path, prompts: Sequence, max_new_tokens: int = 128, n_parallel: int = 8,
                  threads: int = 0, *, template: str = "jinja", build: LlamaBuild | None = None,
                  progress: Progress | None = _stderr_progress, stats: dict | None = None) -> list[str]:
    """Greedy answers of a GGUF model to each prompt (one user turn each), n_parallel sequences per batch.

    threads=0: all cores this process may use (llama.cpp's own default is 4). template: "jinja" (the GGUF's template rendered like llama.cpp's
    default chat path) or "builtin" (llama_chat_apply_template). If `stats` is a dict it receives the generated
    token ids ("tokens") and timing ("seconds", "generated_tokens", "prompt_tokens", "n_parallel").
    """
    texts = _texts(prompts)
    if not texts:
        return []
    res = _run_child({"op": "generate", "gguf": str(path), "prompts": texts, "max_new_tokens": int(max_new_tokens),
                      "n_parallel": int(n_parallel), "threads": int(threads), "template": template}, build, progress)
    if stats is not None:
        stats.update(res["stats"], tokens=res["tokens"])
    return res["texts"]


def score_gguf(path: str | Path, prompts: Sequence[str], candidates: dict[str, list[str]], n_parallel: int = 8,
               threads: int = 0, *, build: LlamaBuild | None = None,
               progress: Progress | None = _stderr_progress) -> list[dict[str, float]]:
    """For each chat prompt, log P(first token of any of candidates[name]) at the assistant's first position."""
    if not prompts:
        return []
    res = _run_child({"op": "score", "gguf": str(path), "prompts": list(prompts), "candidates": candidates,
                      "n_parallel": int(n_parallel), "threads": int(threads)}, build, progress)
    return res["scores"]


def gguf_info(path: str | Path, *, build: LlamaBuild | None = None) -> dict:
    """Load the file in llama.cpp (child process) and report whether it carries a chat template."""
    return _run_child({"op": "info", "gguf": str(path)}, build, None)


# -- transformers (HF directories) ----------------------------------------------------------------
def _load_hf(model_dir: str | Path):  # noqa: ANN202
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return tok, model


def _left_pad(tok, seqs: list[list[int]]):  # noqa: ANN001, ANN202
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids, mask


def generate_hf(model_dir: str | Path, prompts: Sequence, max_new_tokens: int = 128, batch_size: int = 8,
                threads: int = 0, *, progress: Progress | None = _stderr_progress,
                stats: dict | None = None) -> list[str]:
    """Greedy answers from a Hugging Face model directory (float32, left-padded batches, chat template)."""
    import time

    import torch

    texts = _texts(prompts)
    if not texts:
        return []
    if threads > 0:
        torch.set_num_threads(threads)
    tok, model = _load_hf(model_dir)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tok.eos_token_id])
    ids_all = [chat_ids(tok, t) for t in texts]
    answers: list[str] = []
    tokens: list[list[int]] = []
    n_gen, t0 = 0, time.perf_counter()
    for start in range(0, len(texts), batch_size):
        ids, mask = _left_pad(tok, ids_all[start:start + batch_size])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos_ids))
        for row in gen[:, ids.shape[1]:].tolist():
            cut = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
            tokens.append(row[:cut])
            answers.append(tok.decode(row[:cut], skip_special_tokens=True))
            n_gen += cut
        if progress is not None:
            dt = time.perf_counter() - t0
            progress(f"generate (transformers) {len(answers)}/{len(texts)} prompts, {n_gen} tokens, {n_gen / dt:.1f} tok/s")
    if progress is _stderr_progress and sys.stderr.isatty():
        sys.stderr.write("\n")
    if stats is not None:
        stats.update(seconds=time.perf_counter() - t0, generated_tokens=n_gen, tokens=tokens, n_parallel=batch_size)
    return answers


def score_hf(model_dir: str | Path, prompts: Sequence[str], candidates: dict[str, list[str]], batch_size: int = 8,
             *, progress: Progress | None = _stderr_progress) -> list[dict[str, float]]:
    """score_gguf for a Hugging Face directory."""
    import torch

    if not prompts:
        return []
    tok, model = _load_hf(model_dir)
    cand = {name: sorted({tok(w, add_special_tokens=False)["input_ids"][0] for w in words
                          if tok(w, add_special_tokens=False)["input_ids"]}) for name, words in candidates.items()}
    ids_all = [chat_ids(tok, p) for p in prompts]
    out: list[dict[str, float]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(tok, ids_all[start:start + batch_size])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].double()
        lp = torch.log_softmax(logits, -1)
        for r in range(lp.shape[0]):
            out.append({name: float(torch.logsumexp(lp[r, c], 0)) if c else float("-inf") for name, c in cand.items()})
        if progress is not None:
            progress(f"judge (transformers) {len(out)}/{len(prompts)} prompts")
    if progress is _stderr_progress and sys.stderr.isatty():
        sys.stderr.write("\n")
    return out
