"""The child process that runs llama.cpp: `python -m qrealign_gguf.llamacpp.child` (spawned by client.call).

Protocol: one JSON request on stdin {"op", "gguf", "dir", ...op fields}; the result is JSON written to
dir/result.json (arrays as dir/<name>.npy); progress lines on stderr start with binding.PROGRESS_TAG; any failure
exits non-zero with llama.cpp's (or our) message last on stderr. Ops:

    tokenize  texts, add_special               -> {"tokens": [[id, ...], ...]}
    logits    tokens, threads, flash_attn      -> {"shape": [n, n_vocab]} + logits.npy (float32, every position)
    generate  prompts, max_new_tokens, n_parallel, threads, template, [systems | system]
                                               -> {"texts", "tokens", "stats"} (greedy, one user turn per prompt,
                                                  after its system message when given)
    score     prompts, candidates, n_parallel, threads, template, prefix
                                               -> {"scores", "candidate_ids", "stats"}
    info                                       -> {"has_template", "n_vocab"}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..chat import chat_messages
from .binding import Model, load_binding


def _tokenize(m: Model, req: dict) -> dict:
    return {"tokens": [m.tokenize(t, req["add_special"]) for t in req["texts"]]}


def _logits(m: Model, req: dict) -> dict:
    out = m.logits([int(t) for t in req["tokens"]], int(req.get("threads", 2)), bool(req.get("flash_attn")))
    np.save(Path(req["dir"]) / "logits.npy", out)
    return {"shape": list(out.shape)}


def _chat_tokens(m: Model, req: dict) -> list[list[int]]:
    mode = req.get("template", "jinja")
    systems = req.get("systems") or [req.get("system")] * len(req["prompts"])  # one per prompt, or one for all
    return [m.tokenize(m.format_chat(chat_messages(p, s), mode)) for p, s in zip(req["prompts"], systems)]


def _generate(m: Model, req: dict) -> dict:
    out, stats = m.greedy(_chat_tokens(m, req), int(req["max_new_tokens"]), int(req["n_parallel"]),
                          int(req.get("threads", 0)))
    return {"texts": [m.detokenize(o) for o in out], "tokens": out, "stats": stats}


def _score(m: Model, req: dict) -> dict:
    """Log-probabilities (full-vocab log-softmax) of candidate answers' first tokens after each chat prompt."""
    prefix = m.tokenize(req.get("prefix", ""), add_special=False)
    toks = [t + prefix for t in _chat_tokens(m, req)]
    cands: dict[str, list[int]] = {}
    for name, words in req["candidates"].items():
        cands[name] = sorted({ids[0] for w in words if (ids := m.tokenize(w, add_special=False))})
    scores: list[dict] = [{} for _ in toks]

    def on_first(i: int, logits: np.ndarray) -> None:
        x = logits.astype(np.float64)
        lse = np.log(np.sum(np.exp(x - x.max()))) + x.max()
        for name, ids in cands.items():
            v = x[ids] - lse
            scores[i][name] = float(np.log(np.sum(np.exp(v - v.max()))) + v.max()) if ids else float("-inf")

    _, stats = m.greedy(toks, 0, int(req["n_parallel"]), int(req.get("threads", 0)), on_first, label="judge")
    return {"scores": scores, "candidate_ids": cands, "stats": stats}


def _info(m: Model, req: dict) -> dict:
    return {"has_template": m.template is not None, "n_vocab": m.n_vocab}


OPS = {"tokenize": _tokenize, "logits": _logits, "generate": _generate, "score": _score, "info": _info}


def main() -> None:
    req = json.loads(sys.stdin.read())
    op = OPS[req["op"]]
    m = Model(load_binding(), req["gguf"], vocab_only=req["op"] == "tokenize")
    res = op(m, req)
    m.free()
    (Path(req["dir"]) / "result.json").write_text(json.dumps(res), encoding="utf-8")


if __name__ == "__main__":
    main()
