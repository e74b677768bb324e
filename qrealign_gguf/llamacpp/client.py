"""Parent side of the llama.cpp child (child.py): spawn it, send one request, map failures, read the result.

Running llama.cpp in a child process means a GGML_ASSERT/abort on a bad file fails one call with llama.cpp's
message (LlamaCallError) instead of killing the caller; the child dies with its parent (Linux).

    logits(gguf_path, token_ids)              -> float32 array (n_tokens, n_vocab), one forward pass, all positions
                                                 (f32 KV cache, flash attention off: both round through f16)
    tokenize(gguf_path, text, add_special)    -> token ids (special-token text is parsed, like HF does)
    call(op, gguf_path, fields, build, ...)   -> the child's result dict (generate / score / info: evaluate.generate)
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
from typing import Callable

import numpy as np

from .binding import PROGRESS_TAG
from .build import LlamaBuild, custom_type_note, find_llama

Progress = Callable[[str], None]


class LlamaCallError(RuntimeError):
    pass


def logits(gguf_path: str | Path, token_ids: list[int], *, build: LlamaBuild | None = None,
           n_threads: int = 2, flash_attn: bool = False) -> np.ndarray:
    res = call("logits", gguf_path, {"tokens": [int(t) for t in token_ids], "threads": n_threads,
                                     "flash_attn": flash_attn}, build, arrays=("logits",))
    return res["logits"]


def tokenize(gguf_path: str | Path, text: str, add_special: bool = True, *,
             build: LlamaBuild | None = None) -> list[int]:
    return tokenize_many(gguf_path, [text], add_special, build=build)[0]


def tokenize_many(gguf_path: str | Path, texts: list[str], add_special: bool = True, *,
                  build: LlamaBuild | None = None) -> list[list[int]]:
    return call("tokenize", gguf_path, {"texts": list(texts), "add_special": add_special}, build)["tokens"]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux): no orphaned llama.cpp runs
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, other platforms
        pass


def _child_env(b: LlamaBuild) -> dict[str, str]:
    env = b.env()
    env["QREALIGN_LLAMA_BINDING"] = str(b.python_binding)
    # The pinned build uses OpenMP; its default busy-wait at every graph barrier collapses throughput when the
    # cores are shared (measured on a loaded 2-core box: 3.6 -> 11.2 tok/s batched). Same numbers either way.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def call(op: str, gguf_path: str | Path, fields: dict, build: LlamaBuild | None = None,
         progress: Progress | None = None, arrays: tuple[str, ...] = ()) -> dict:
    """Run one op (child.py) on gguf_path in a fresh child; `arrays` names the .npy results to load into the dict.

    Progress lines go to `progress`; res["stats"]["child_cpu_seconds"] is the child's whole CPU time (load + run).
    A failing child raises LlamaCallError: one line when a stock build meets qrealign's custom tensor types,
    else llama.cpp's last stderr lines.
    """
    b = build or find_llama()
    with tempfile.TemporaryDirectory(prefix="qrealign-llama-") as d:
        req = dict(fields, op=op, gguf=str(gguf_path), dir=d)
        proc = subprocess.Popen([sys.executable, "-m", "qrealign_gguf.llamacpp.child"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_child_env(b),
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
        if rc != 0:
            note = custom_type_note(gguf_path) if b.flavour != "patched" else None
            if note:  # a QR4_KO (...) file in stock llama.cpp: say why in one line, not with the loader's log
                raise LlamaCallError(note)
            raise LlamaCallError(f"llama.cpp {op} on {gguf_path} failed (exit {rc}):\n" + "\n".join(tail))
        res = json.loads((Path(d) / "result.json").read_text(encoding="utf-8"))
        for name in arrays:
            res[name] = np.load(Path(d) / f"{name}.npy")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res.setdefault("stats", {})["child_cpu_seconds"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return res
