"""Child side of evaluate.generate: greedy batched generation and next-token scoring in the pinned llama.cpp.

Runs as `python -m qrealign_gguf.evaluate._child` (see generate._run_child) so that a GGML_ASSERT/abort in
llama.cpp fails one call with llama.cpp's message instead of killing the caller. Request: JSON on stdin;
result: JSON written to req["out"]. Progress lines on stderr start with PROGRESS_TAG.

Prompt formatting follows llama.cpp's own chat path (common/chat.cpp, jinja on by default in the pinned build):
the GGUF's `tokenizer.chat_template` (llama_model_chat_template) rendered as Jinja with messages, bos_token,
eos_token and add_generation_prompt; a leading BOS text is dropped when the vocab adds BOS itself; then
llama_tokenize(add_special=True, parse_special=True). `template="builtin"` uses llama_chat_apply_template
instead (llama.cpp's hard-coded template detection: no default system prompts, as with `--no-jinja`).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time

import numpy as np

from qrealign_gguf.llama_logits import _binding, _load

PROGRESS_TAG = "[qrealign-progress]"


def render_jinja(template: str, messages: list[dict], bos: str, eos: str, add_generation_prompt: bool = True) -> str:
    """Render a chat template the way transformers / llama.cpp --jinja do (trim_blocks, lstrip_blocks, sandboxed)."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                            add_generation_prompt=add_generation_prompt)


class Runtime:
    def __init__(self, L, path: str) -> None:  # noqa: ANN001 - ctypes module
        self.L = L
        self.model = _load(L, path, vocab_only=False)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        tmpl = L.llama_model_chat_template(self.model, None)
        self.template = tmpl.decode("utf-8") if tmpl else None

    def piece(self, tok: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, tok, buf, 256, 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", "replace")

    def format_chat(self, messages: list[dict], mode: str) -> str:
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
        keep = []
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

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, True)
        if n < 0:
            raise SystemExit(f"llama_tokenize failed ({n})")
        return list(buf[:n])

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

    def run(self, prompts: list[list[int]], max_new: int, n_parallel: int, threads: int, on_first=None,
            label: str = "generate") -> tuple[list[list[int]], dict]:
        """Greedy continuation of every prompt, n_parallel sequences per llama_batch (continuous batching).

        Each slot is its own sequence id with its own KV stream (kv_unified=false), so a prompt's attention sees
        only its own cells, laid out from cell 0 exactly as when it runs alone. max_new=0 stops after the first
        logits (scoring); on_first(i, logits) sees each prompt's next-token logits.
        """
        L = self.L
        n = len(prompts)
        n_par = max(1, min(n_parallel, n))
        longest = max(len(p) for p in prompts)
        n_ctx_seq = -(-(longest + max(max_new, 1) + 1) // 256) * 256
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx_seq * n_par
        cp.n_seq_max = n_par
        cp.kv_unified = False
        cp.n_batch = cp.n_ubatch = max(512, n_par)
        # llama.cpp's library default is 4 threads whatever the machine; oversubscribing 2 cores stalls badly
        cp.n_threads = cp.n_threads_batch = threads if threads > 0 else max(1, len(os.sched_getaffinity(0)))
        cp.no_perf = True
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise SystemExit("llama_init_from_model failed")
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
                    t = sl["feed"].pop(0)
                    self._put(batch, nt, t, sl["pos"], s, True)
                    sl["pos"] += 1
                    rows.append((s, nt))
                    nt += 1
            for s, sl in enumerate(slots):  # then prompt prefill, as much as fits
                if sl is None or sl["pos"] >= len(prompts[sl["i"]]):
                    continue
                while sl["feed"] and nt < cap:
                    t = sl["feed"].pop(0)
                    last_tok = not sl["feed"]
                    self._put(batch, nt, t, sl["pos"], s, last_tok)
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

    def _put(self, batch, k: int, tok: int, pos: int, seq: int, logits: bool) -> None:  # noqa: ANN001
        batch.token[k] = tok
        batch.pos[k] = pos
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = seq
        batch.logits[k] = logits


def _generate(rt: Runtime, req: dict) -> dict:
    texts = [rt.format_chat([{"role": "user", "content": p}], req.get("template", "jinja")) for p in req["prompts"]]
    toks = [rt.tokenize(t) for t in texts]
    out, stats = rt.run(toks, int(req["max_new_tokens"]), int(req["n_parallel"]), int(req.get("threads", 0)))
    return {"texts": [rt.detokenize(o) for o in out], "tokens": out, "stats": stats}


def _score(rt: Runtime, req: dict) -> dict:
    """Log-probabilities (full-vocab log-softmax) of candidate answers' first tokens after each chat prompt."""
    texts = [rt.format_chat([{"role": "user", "content": p}], req.get("template", "jinja")) for p in req["prompts"]]
    toks = [rt.tokenize(t) + rt.tokenize(req.get("prefix", ""), add_special=False) for t in texts]
    cands: dict[str, list[int]] = {}
    for name, words in req["candidates"].items():
        ids = {rt.tokenize(w, add_special=False)[0] for w in words if rt.tokenize(w, add_special=False)}
        cands[name] = sorted(ids)
    scores: list[dict] = [{} for _ in toks]

    def on_first(i: int, logits: np.ndarray) -> None:
        x = logits.astype(np.float64)
        lse = np.log(np.sum(np.exp(x - x.max()))) + x.max()
        for name, ids in cands.items():
            v = x[ids] - lse
            scores[i][name] = float(np.log(np.sum(np.exp(v - v.max()))) + v.max()) if ids else float("-inf")

    _, stats = rt.run(toks, 0, int(req["n_parallel"]), int(req.get("threads", 0)), on_first, label="judge")
    return {"scores": scores, "candidate_ids": cands, "stats": stats}


def _info(rt: Runtime, req: dict) -> dict:
    return {"has_template": rt.template is not None, "n_vocab": rt.n_vocab}


def _main() -> None:
    req = json.loads(sys.stdin.read())
    L = _binding()
    rt = Runtime(L, req["gguf"])
    res = {"generate": _generate, "score": _score, "info": _info}[req["op"]](rt, req)
    L.llama_model_free(rt.model)
    with open(req["out"], "w", encoding="utf-8") as f:
        json.dump(res, f)


if __name__ == "__main__":
    _main()
