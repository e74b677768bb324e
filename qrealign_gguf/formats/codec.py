"""Python face of the native codec (native/*.c via cffi): quantize, dequantize, pack, unpack.

Arrays in, arrays out; row-major 2-D float32 weights (rows x cols, ggml's ne[1] x ne[0]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .types import QType, qtype as _lookup

try:
    from qrealign_gguf import _native  # built by `pip install -e .` (native/build_ffi.py)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError("qrealign_gguf._native is not built; run `make install` (or pip install -e .)") from exc

_ffi, _lib = _native.ffi, _native.lib
_ERRORS = {-1: "unsupported type", -2: "row length not a multiple of the block size",
           -3: "bad argument", -4: "out of memory"}


def _t(t: QType | str) -> QType:
    return _lookup(t) if isinstance(t, str) else t


def _check_cols(t: QType, cols: int) -> None:
    if cols <= 0 or cols % t.block_size:
        raise ValueError(f"{t.name}: row length {cols} is not a multiple of the block size {t.block_size}")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"{what}: {_ERRORS.get(rc, f'error {rc}')}")


def _ptr(a: np.ndarray | None, ctype: str):  # noqa: ANN202 - cffi pointer
    if a is None:
        return _ffi.NULL
    assert a.flags.c_contiguous
    return _ffi.cast(ctype, a.ctypes.data)


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(-1, x.shape[-1])


def quantize(x: np.ndarray, t: QType | str, imatrix: np.ndarray | None = None, threads: int = 0) -> np.ndarray:
    """Encode rows of x; returns uint8 (rows, row_bytes). imatrix=None is ggml's round-to-nearest reference."""
    t, x = _t(t), _rows(x)
    rows, cols = x.shape
    out = np.empty((rows, t.row_bytes(cols)), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if im is not None and im.shape != (cols,):
        raise ValueError(f"imatrix has {im.size} entries, rows have {cols} columns")
    _check(_lib.qr_quantize(t.id, _ptr(x, "float *"), _ptr(out, "void *"), rows, cols,
                            _ptr(im, "float *"), threads), f"quantize {t.name}")
    return out


def dequantize(data: np.ndarray, t: QType | str, cols: int, threads: int = 0) -> np.ndarray:
    """Decode packed rows back to float32 (rows, cols), exactly as ggml's dequantize_row_*."""
    t = _t(t)
    _check_cols(t, cols)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows = data.size // t.row_bytes(cols)
    out = np.empty((rows, cols), dtype=np.float32)
    _check(_lib.qr_dequantize(t.id, _ptr(data, "void *"), _ptr(out, "float *"), rows, cols, threads),
           f"dequantize {t.name}")
    return out


@dataclass
class BlockParams:
    """A tensor's quantization decisions in the format's own parameterization (see native/qrealign.h).

    q: (rows, cols) uint8 codes; d/dmin: (rows, nblocks) float16; sc/mn: (rows, nblocks, nsub) uint8.
    Types with outliers (QR4_KO): oidx (rows, nblocks, n_outliers) uint8 positions inside the block,
    strictly increasing, and oval (rows, nblocks, n_outliers) float16 values.
    """
    q: np.ndarray
    d: np.ndarray
    dmin: np.ndarray | None = None
    sc: np.ndarray | None = None
    mn: np.ndarray | None = None
    oidx: np.ndarray | None = None
    oval: np.ndarray | None = None


def pack(t: QType | str, p: BlockParams) -> np.ndarray:
    """Write exactly these codes and scales (no re-rounding). Returns uint8 (rows, row_bytes)."""
    t = _t(t)
    q = np.ascontiguousarray(p.q, dtype=np.uint8)
    rows, cols = q.shape
    out = np.empty((rows, t.row_bytes(cols)), dtype=np.uint8)
    f16 = lambda a: None if a is None else np.ascontiguousarray(a, dtype=np.float16).view(np.uint16)  # noqa: E731
    u8 = lambda a: None if a is None else np.ascontiguousarray(a, dtype=np.uint8)  # noqa: E731
    d, dmin, sc, mn = f16(p.d), f16(p.dmin), u8(p.sc), u8(p.mn)
    oidx, oval = (u8(p.oidx), f16(p.oval)) if t.n_outliers else (None, None)
    if t.n_outliers and (oidx is None or oval is None):
        raise ValueError(f"pack {t.name}: the outliers (oidx, oval) are required")
    _check(_lib.qr_pack_outliers(t.id, _ptr(q, "uint8_t *"), _ptr(d, "uint16_t *"), _ptr(dmin, "uint16_t *"),
                                 _ptr(sc, "uint8_t *"), _ptr(mn, "uint8_t *"), _ptr(oidx, "uint8_t *"),
                                 _ptr(oval, "uint16_t *"), _ptr(out, "void *"), rows, cols),
           f"pack {t.name}")
    return out


def unpack(data: np.ndarray, t: QType | str, cols: int) -> BlockParams:
    """Read the codes and scales back out of packed rows."""
    t = _t(t)
    _check_cols(t, cols)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows, nb = data.size // t.row_bytes(cols), cols // t.block_size
    p = BlockParams(q=np.empty((rows, cols), np.uint8), d=np.empty((rows, nb), np.float16),
                    dmin=np.empty((rows, nb), np.float16) if t.has_min else None,
                    sc=np.empty((rows, nb, t.nsub), np.uint8) if t.nsub else None,
                    mn=np.empty((rows, nb, t.nsub), np.uint8) if t.has_min and t.nsub else None,
                    oidx=np.empty((rows, nb, t.n_outliers), np.uint8) if t.n_outliers else None,
                    oval=np.empty((rows, nb, t.n_outliers), np.float16) if t.n_outliers else None)
    v16 = lambda a: None if a is None else a.view(np.uint16)  # noqa: E731
    _check(_lib.qr_unpack_outliers(t.id, _ptr(data, "void *"), _ptr(p.q, "uint8_t *"), _ptr(v16(p.d), "uint16_t *"),
                                   _ptr(v16(p.dmin), "uint16_t *"), _ptr(p.sc, "uint8_t *"), _ptr(p.mn, "uint8_t *"),
                                   _ptr(p.oidx, "uint8_t *"), _ptr(v16(p.oval), "uint16_t *"), rows, cols),
           f"unpack {t.name}")
    return p


def to_f16(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint16)
    _lib.qr_fp32_to_fp16(_ptr(x, "float *"), _ptr(out, "uint16_t *"), x.size)
    return out.view(np.float16)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns as uint16 (numpy has no bfloat16)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint16)
    _lib.qr_fp32_to_bf16(_ptr(x, "float *"), _ptr(out, "uint16_t *"), x.size)
    return out
