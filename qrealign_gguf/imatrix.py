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
    from .gguf_file import GGUFFormatError
    from .gguf_read import GGUFReader

    try:  # an imatrix's only array is its short list of datasets: refuse a file whose metadata would swamp gguf-py
        r = GGUFReader(path, max_array_items=1 << 16)
    except (GGUFFormatError, OSError) as e:
        raise InputError(f"{path} is not an imatrix GGUF file ({e}); create one with llama-imatrix or --calib") from None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if not t.name.endswith((".in_sum2", ".counts")):
            continue
        if t.tensor_type != gguf.GGMLQuantizationType.F32:  # llama-imatrix writes F32; other bytes are no sums
            raise InputError(f"{path}: tensor {t.name} is {t.tensor_type.name}, an imatrix holds F32 tensors; "
                             "create one with llama-imatrix or --calib")
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
        n = float(c[0])
        if not np.isfinite(n) or n < 0:  # a token count: NaN or negative would pass through as garbage importance
            raise InputError(f"{path}: tensor {name} has a token count of {n}; the imatrix file is broken, "
                             "create it again with llama-imatrix or --calib")
        out[name] = s / n if n > 0 else np.ones_like(s)  # no tokens seen: no preference between columns
    return out


def check_imatrix(imatrix: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse an imatrix made for another model, or with values no mean of squares can have (NaN, Inf,
    negative, or all zero for a tensor), before any encoding starts: the encoders weigh each weight's
    rounding error by its column's importance, so such values silently give NaN or all-zero blocks."""
    matrices = {n: s for n, s in shapes.items() if len(s) >= 2}
    hits = 0
    for name, vec in imatrix.items():
        if name not in matrices:
            continue
        hits += 1
        if vec.size != matrices[name][-1]:
            raise InputError(f"imatrix {source} does not match this model: {name} has {vec.size} columns there, "
                             f"{matrices[name][-1]} here; use an imatrix computed for this model")
        _check_importance_values(name, np.asarray(vec).reshape(-1), source)
    if hits == 0:
        raise InputError(f"imatrix {source} names none of this model's tensors; use an imatrix computed for this model")


def _check_importance_values(name: str, vec: np.ndarray, source: str) -> None:
    """An importance is a mean of squared activations: finite, >= 0, and not zero everywhere."""
    fix = "recompute it (llama-imatrix or --calib) from prompts the model handles"
    for bad, what in ((np.isnan(vec), "NaN"), (np.isinf(vec), "Inf"), (vec < 0, "negative")):
        if bad.any():
            col = int(np.argmax(bad))
            raise InputError(f"imatrix {source}: {name} has {int(bad.sum())} {what} importance value(s) (first in "
                             f"column {col}: {vec[col]}); an importance is a mean of squares: {fix}")
    if not vec.any():  # a tensor whose input was never nonzero: every block would be encoded as zero
        raise InputError(f"imatrix {source}: {name} has all zero importance, which would quantize the whole tensor "
                         f"to zero; {fix}")


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
