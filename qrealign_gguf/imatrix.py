"""Importance matrices: per-column mean squared activation feeding each weight matrix.

Read llama.cpp's imatrix GGUF (`<tensor>.in_sum2` / `<tensor>.counts`, normalized the way llama-quantize
does), or compute one ourselves from calibration prompts with the HF model in torch, and write it in the
same GGUF format so llama-quantize can use ours too.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np

from .errors import InputError


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> importance (ncols,). Only the GGUF format (llama-imatrix's default) is read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"imatrix file {path} does not exist")
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise InputError(f"{path} is not an imatrix GGUF file ({e}); create one with llama-imatrix or --calib") from None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        data = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = data
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = data
    if not sums:
        raise InputError(f"{path} holds no imatrix data (*.in_sum2 tensors); is it a model file rather than an imatrix?")
    out: dict[str, np.ndarray] = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None or c.size != 1:  # we convert dense models only: one count per tensor
            raise InputError(f"{path}: tensor {name} has {0 if c is None else c.size} counts; only dense-model imatrix files are supported")
        out[name] = s / c[0] if c[0] > 0 else np.ones_like(s)
    return out


def check_imatrix(imatrix: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse an imatrix made for another model before any encoding starts."""
    matrices = {n: s for n, s in shapes.items() if len(s) >= 2}
    hits = 0
    for name, vec in imatrix.items():
        if name not in matrices:
            continue
        hits += 1
        if vec.size != matrices[name][-1]:
            raise InputError(f"imatrix {source} does not match this model: {name} has {vec.size} columns there, "
                             f"{matrices[name][-1]} here; use an imatrix computed for this model")
    if hits == 0:
        raise InputError(f"imatrix {source} names none of this model's tensors; use an imatrix computed for this model")


def save_imatrix(path: str | Path, imatrix: dict[str, np.ndarray], n_tokens: int, datasets: Iterable[str],
                 chunk_size: int = 512) -> None:
    """Write llama.cpp's imatrix GGUF: in_sum2 = importance * count, counts = n_tokens."""
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", max(1, n_tokens // chunk_size))
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name, vec in imatrix.items():
        w.add_tensor(f"{name}.in_sum2", (vec * n_tokens).astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[float(n_tokens)]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
