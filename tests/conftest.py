"""Shared fixtures: the pinned llama.cpp build (the oracle) and libggml's own quantizer via cffi."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cffi import FFI

from qrealign_gguf.llamacpp import LlamaBuild, find_llama

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def llama() -> LlamaBuild:
    return find_llama()


class GGML:
    """ggml_quantize_chunk / dequantize straight from the pinned libggml-base (the bit-exactness oracle)."""

    def __init__(self, lib_dir: Path) -> None:
        self.ffi = FFI()
        self.ffi.cdef("""
            size_t ggml_quantize_chunk(int type, const float * src, void * dst, int64_t start,
                                       int64_t nrows, int64_t n_per_row, const float * imatrix);
            void ggml_quantize_init(int type);
            typedef struct { int type; } dummy_t;
            const void * ggml_get_type_traits(int type);
            size_t ggml_row_size(int type, int64_t ne);
        """)
        self.lib = self.ffi.dlopen(str(lib_dir / "libggml-base.so"))

    def quantize(self, x: np.ndarray, type_id: int, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        self.lib.ggml_quantize_init(type_id)
        out = np.zeros((rows, self.lib.ggml_row_size(type_id, cols)), dtype=np.uint8)
        im = self.ffi.NULL if imatrix is None else self.ffi.cast("float *", np.ascontiguousarray(imatrix, np.float32).ctypes.data)
        self.lib.ggml_quantize_chunk(type_id, self.ffi.cast("float *", x.ctypes.data),
                                     self.ffi.cast("void *", out.ctypes.data), 0, rows, cols, im)
        return out


@pytest.fixture(scope="session")
def ggml(llama: LlamaBuild) -> GGML:
    return GGML(llama.lib_dir)


def adversarial_rows(cols: int, rng: np.random.Generator) -> np.ndarray:
    """Rows that break naive quantizers: zeros, constants, outliers, denormals, tiny and huge magnitudes."""
    rows = [
        rng.standard_normal(cols),
        np.zeros(cols),
        np.full(cols, 0.37),
        np.full(cols, -2.5),
        rng.standard_normal(cols) * 1e-3,
        rng.standard_normal(cols) * 1e3,
        np.where(rng.random(cols) < 0.01, 300.0, 1.0) * rng.standard_normal(cols),  # huge outliers
        rng.standard_normal(cols) * 1e-40,  # float32 denormals
        np.abs(rng.standard_normal(cols)),  # all positive
        -np.abs(rng.standard_normal(cols)),  # all negative
        rng.integers(-8, 8, cols).astype(np.float64),  # already on an integer grid
        np.linspace(-1, 1, cols),
    ]
    x = np.stack(rows).astype(np.float32)
    x[3, ::7] = 0.0
    return x
