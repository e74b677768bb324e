"""libllama through the sdist's pure-python ctypes binding -- imported only inside the child process (child.py).

Only the binding's llama_cpp.llama_cpp module is loaded (LlamaBuild.python_binding, path in QREALIGN_LLAMA_BINDING):
the package __init__ pulls in server-side extras we do not need. Model wraps one loaded GGUF: tokenization,
chat formatting, one forward pass over every position (logits) and greedy continuous-batching generation.

Chat formatting follows llama.cpp's own chat path (common/chat.cpp, jinja on by default in the pinned build): the
GGUF's `tokenizer.chat_template` rendered as Jinja with messages, bos_token, eos_token and add_generation_prompt;
a leading BOS text is dropped when the vocab adds BOS itself. `mode="builtin"` uses llama_chat_apply_template
instead (llama.cpp's hard-coded template detection: no default system prompts, as with `--no-jinja`).
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import sys
import time
import types
from typing import Callable

import numpy as np

GGML_TYPE_F32 = 0
PROGRESS_TAG = "[qrealign-progress]"  # stderr lines the parent turns into progress callbacks (client.py)


def load_binding():  # noqa: ANN201 - the ctypes module llama_cpp.llama_cpp
    pkg = types.ModuleType("llama_cpp")  # a bare package: skips the sdist's __init__ and its extras
    pkg.__path__ = [os.environ["QREALIGN_LLAMA_BINDING"]]
    sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


def render_jinja(template: str, messages: list[dict], bos: str, eos: str, add_generation_prompt: bool = True) -> str:
    """Render a chat template the way transformers / llama.cpp --jinja do (trim_blocks, lstrip_blocks, sandboxed)."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent,
                                                                                      ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                            add_generation_prompt=add_generation_prompt)


class Model:
    """One GGUF loaded on the CPU (n_gpu_layers=0); vocab_only loads just the tokenizer."""

    def __init__(self, L, path: str, vocab_only: bool = False) -> None:  # noqa: ANN001 - ctypes module
        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.vocab_only = vocab_only
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        tmpl = L.llama_model_chat_template(self.model, None)
        self.template = tmpl.decode("utf-8") if tmpl else None

    def free(self) -> None:
        self.L.llama_model_free(self.model)

    # -- text <-> tokens --------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Special-token text is parsed (parse_special=True), like HF tokenizers do."""
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        for _ in range(2):
            buf = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, True)
            if n >= 0:
                return list(buf[:n])
            cap = -n  # llama_tokenize returns minus the room it needs
        raise SystemExit(f"llama_tokenize failed ({n})")

    def detokenize(self, toks: list[int]) -> str:
        if not toks:
            return ""
        arr = (self.L.llama_token * len(toks))(*toks)
        cap = 16 * len(toks) + 64
        buf = ctypes.create_string_buffer(cap)
        n = self.L.llama_detokenize(self.vocab, arr, len(toks), buf, cap, False, False)
        if n < 0:
            cap = -n + 1
            buf = ctypes.create_string_buffer(cap)
            n = self.L.llama_detokenize(self.vocab, arr, len(toks), buf, cap, False, False)
        return buf.raw[:n].decode("utf-8", "replace")

    def piece(self, tok: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, tok, buf, 256, 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", "replace")

    def format_chat(self, messages: list[dict], mode: str) -> str:
        """The prompt text for these messages; mode "jinja" or "builtin" (module docstring)."""
        L = self.L
        if self.template is None:
            raise SystemExit("the GGUF has no chat template (tokenizer.chat_template)")
        if mode == "jinja":
            bos_id, eos_id = L.llama_vocab_bos(self.vocab), L.llama_vocab_eos(self.vocab)
            bos = self.piece(bos_id) if bos_id >= 0 else ""
            eos = self.piece(eos_id) if eos_id >= 0 else ""
            text = render_jinja(self.template, messages, bos, eos, True)
            if L.llama_vocab_get_add_bos(self.vocab) and bos and text.startswith(bos):
                text = text[len(bos):]
            if L.llama_vocab_get_add_eos(self.vocab) and eos and text.endswith(eos):
                text = text[:-len(eos)]
            return text
        msgs = (L.llama_chat_message * len(messages))()
        keep = []  # the encoded strings must outlive the call
        for i, m in enumerate(messages):
            r, c = m["role"].encode(), m["content"].encode("utf-8")
            keep += [r, c]
            msgs[i].role, msgs[i].content = r, c
        cap = 2 * sum(len(k) for k in keep) + 1024
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = L.llama_chat_apply_template(self.template.encode("utf-8"), msgs, len(messages), True, buf, cap)
            if n < 0:
                raise SystemExit("llama_chat_apply_template does not know this model's chat template; use jinja")
            if n <= cap:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = n + 1
        raise SystemExit("llama_chat_apply_template kept growing")

    # -- forward passes ---------------------------------------------------------------------------
    def _context(self, n_ctx: int, n_batch: int, threads: int, n_seq: int = 1):  # noqa: ANN202
        cp = self.L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_seq_max = n_seq
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        return cp

    def _init(self, cp):  # noqa: ANN001, ANN202
        ctx = self.L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise SystemExit("llama_init_from_model failed")
        return ctx

    def logits(self, tokens: list[int], threads: int, flash_attn: bool) -> np.ndarray:
        """float32 (n_tokens, n_vocab): one forward pass, every position (f32 KV cache; flash attention off unless
        asked: both round through f16 on the CPU)."""
        L, n = self.L, len(tokens)
        cp = self._context(max(64, n), max(1, n), threads)
        cp.type_k = cp.type_v = GGML_TYPE_F32  # an f16 KV cache alone moves logits by ~1e-3
        cp.flash_attn_type = 1 if flash_attn else 0
        ctx = self._init(cp)
        batch = L.llama_batch_init(n, 0, 1)
        for i, t in enumerate(tokens):
            _put(batch, i, t, i, 0, True)
        batch.n_tokens = n
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")
        out = np.empty((n, self.n_vocab), dtype=np.float32)
        for i in range(n):
            out[i] = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        return out

    def greedy(self, prompts: list[list[int]], max_new: int, n_parallel: int, threads: int,
               on_first: Callable[[int, np.ndarray], None] | None = None,
               label: str = "generate") -> tuple[list[list[int]], dict]:
        """Greedy continuation of every prompt, n_parallel sequences per llama_batch (continuous batching).

        Each slot is its own sequence id with its own KV stream (kv_unified=false), so a prompt's attention sees
        only its own cells, laid out from cell 0 exactly as when it runs alone. max_new=0 stops after the first
        logits (scoring); on_first(i, logits) sees each prompt's next-token logits. threads<=0: every core this
        process may use (llama.cpp's library default is 4 whatever the machine; oversubscribing stalls badly).
        """
        L = self.L
        n = len(prompts)
        n_par = max(1, min(n_parallel, n))
        longest = max(len(p) for p in prompts)
        n_ctx_seq = -(-(longest + max(max_new, 1) + 1) // 256) * 256
        cp = self._context(n_ctx_seq * n_par, max(512, n_par),
                           threads if threads > 0 else max(1, len(os.sched_getaffinity(0))), n_par)
        cp.kv_unified = False
        ctx = self._init(cp)
        mem = L.llama_get_memory(ctx)
        cap = cp.n_batch
        batch = L.llama_batch_init(cap, 0, 1)
        queue = list(range(n))
        slots: list[dict | None] = [None] * n_par
        out: list[list[int]] = [[] for _ in range(n)]
        done = n_gen = n_prompt = 0
        t0 = last = time.perf_counter()
        while queue or any(slots):
            for s in range(n_par):
                if slots[s] is None and queue:
                    i = queue.pop(0)
                    L.llama_memory_seq_rm(mem, s, -1, -1)
                    slots[s] = {"i": i, "feed": list(prompts[i]), "pos": 0}
            nt = 0
            rows: list[tuple[int, int]] = []  # (slot, batch row) whose logits we read
            for s, sl in enumerate(slots):  # decode steps first: one token each
                if sl is not None and sl["pos"] >= len(prompts[sl["i"]]) and sl["feed"]:
                    _put(batch, nt, sl["feed"].pop(0), sl["pos"], s, True)
                    sl["pos"] += 1
                    rows.append((s, nt))
                    nt += 1
            for s, sl in enumerate(slots):  # then prompt prefill, as much as fits
                if sl is None or sl["pos"] >= len(prompts[sl["i"]]):
                    continue
                while sl["feed"] and nt < cap:
                    t = sl["feed"].pop(0)
                    last_tok = not sl["feed"]
                    _put(batch, nt, t, sl["pos"], s, last_tok)
                    sl["pos"] += 1
                    n_prompt += 1
                    if last_tok:
                        rows.append((s, nt))
                    nt += 1
                if nt >= cap:
                    break
            batch.n_tokens = nt
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise SystemExit(f"llama_decode returned {rc}")
            for s, row in rows:
                sl = slots[s]
                i = sl["i"]
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))
                if on_first is not None and not out[i] and sl["pos"] == len(prompts[i]):
                    on_first(i, logits)
                tok = int(np.argmax(logits))
                finished = max_new == 0 or L.llama_vocab_is_eog(self.vocab, tok)
                if not finished:
                    out[i].append(tok)
                    n_gen += 1
                    finished = len(out[i]) >= max_new
                if finished:
                    slots[s] = None
                    done += 1
                else:
                    sl["feed"].append(tok)
            now = time.perf_counter()
            if now - last > 2.0 or done == n and not any(slots):
                last = now
                rate = f", {n_gen} tokens, {n_gen / max(now - t0, 1e-9):.1f} tok/s" if max_new else ""
                sys.stderr.write(f"{PROGRESS_TAG} {label} {done}/{n} prompts{rate}\n")
                sys.stderr.flush()
        secs = time.perf_counter() - t0
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        return out, {"seconds": secs, "generated_tokens": n_gen, "prompt_tokens": n_prompt, "n_parallel": n_par}


def _put(batch, k: int, tok: int, pos: int, seq: int, logits: bool) -> None:  # noqa: ANN001 - llama_batch
    batch.token[k] = tok
    batch.pos[k] = pos
    batch.n_seq_id[k] = 1
    batch.seq_id[k][0] = seq
    batch.logits[k] = logits
