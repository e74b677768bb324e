"""Logits and tokenization from the pinned llama.cpp, each call in a child process.

The child loads libllama through the sdist's pure-python ctypes binding (LlamaBuild.python_binding, only its
llama_cpp.llama_cpp module: the package __init__ pulls in server-side extras we do not need). Running it in a
subprocess means a GGML_ASSERT/abort on a bad file fails the call with llama.cpp's message, not the caller.

    logits(gguf_path, token_ids)              -> float32 array (n_tokens, n_vocab), one forward pass, all positions
                                                 (f32 KV cache, flash attention off: both round through f16)
    tokenize(gguf_path, text, add_special)    -> token ids (special-token text is parsed, like HF does)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .llama_runtime import LlamaBuild, custom_type_note, find_llama

GGML_TYPE_F32 = 0


class LlamaCallError(RuntimeError):
    pass


def logits(gguf_path: str | Path, token_ids: list[int], *, build: LlamaBuild | None = None,
           n_threads: int = 2, flash_attn: bool = False) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="qrealign-logits-") as d:
        out = Path(d) / "logits.npy"
        _call(build, {"op": "logits", "gguf": str(gguf_path), "tokens": [int(t) for t in token_ids],
                      "out": str(out), "threads": n_threads,
                      "flash_attn": flash_attn})
        return np.load(out)


def tokenize(gguf_path: str | Path, text: str, add_special: bool = True, *, build: LlamaBuild | None = None) -> list[int]:
    return tokenize_many(gguf_path, [text], add_special, build=build)[0]


def tokenize_many(gguf_path: str | Path, texts: list[str], add_special: bool = True, *,
                  build: LlamaBuild | None = None) -> list[list[int]]:
    return _call(build, {"op": "tokenize", "gguf": str(gguf_path), "texts": list(texts), "add_special": add_special})


def _call(build: LlamaBuild | None, req: dict) -> list:
    b = build or find_llama()
    env = b.env()
    env["QREALIGN_LLAMA_BINDING"] = str(b.python_binding)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "qrealign_gguf.llama_logits"], input=json.dumps(req),
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        note = custom_type_note(req["gguf"]) if b.flavour != "patched" else None
        if note:  # a QR4_KO (...) file in stock llama.cpp: say why in one line, not with the loader's log
            raise LlamaCallError(note)
        tail = "\n".join(res.stderr.strip().splitlines()[-15:])
        raise LlamaCallError(f"llama.cpp {req['op']} on {req['gguf']} failed (exit {res.returncode}):\n{tail}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- child side -----------------------------------------------------------------------------------
def _binding():
    import importlib
    import types
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [os.environ["QREALIGN_LLAMA_BINDING"]]
    sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


def _load(L, path: str, vocab_only: bool):
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.vocab_only = vocab_only
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    return model


def _child_tokenize(L, req: dict) -> list[list[int]]:
    model = _load(L, req["gguf"], vocab_only=True)
    vocab = L.llama_model_get_vocab(model)
    out = []
    for text in req["texts"]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, cap, req["add_special"], True)
        if n < 0:
            raise SystemExit(f"llama_tokenize failed ({n})")
        out.append(list(buf[:n]))
    L.llama_model_free(model)
    return out


def _child_logits(L, req: dict) -> list:
    tokens = req["tokens"]
    n = len(tokens)
    model = _load(L, req["gguf"], vocab_only=False)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cp = L.llama_context_default_params()
    cp.n_ctx = max(64, n)
    cp.n_batch = cp.n_ubatch = max(1, n)
    cp.n_threads = cp.n_threads_batch = int(req.get("threads", 2))
    cp.type_k = cp.type_v = GGML_TYPE_F32  # an f16 KV cache alone moves logits by ~1e-3
    cp.no_perf = True
    cp.flash_attn_type = 1 if req.get("flash_attn") else 0  # CPU flash attention rounds through f16
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama_init_from_model failed")
    batch = L.llama_batch_init(n, 0, 1)
    for i, t in enumerate(tokens):
        batch.token[i] = t
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = True
    batch.n_tokens = n
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        raise SystemExit(f"llama_decode returned {rc}")
    out = np.empty((n, n_vocab), dtype=np.float32)
    for i in range(n):
        out[i] = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
    np.save(req["out"], out)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return [n, n_vocab]


def _main() -> None:
    req = json.loads(sys.stdin.read())
    L = _binding()
    result = _child_tokenize(L, req) if req["op"] == "tokenize" else _child_logits(L, req)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    _main()
