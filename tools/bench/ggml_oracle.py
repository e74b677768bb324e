"""ggml's own block quantizer (`ggml_quantize_chunk` of the pinned libggml-base, via cffi): the bit-exactness
oracle of the codec tests (tests/conftest.py) and the peer of the encoder benchmark (bench_encoders.py)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from cffi import FFI


class GGML:
    def __init__(self, lib_dir: Path) -> None:
        self.ffi = FFI()
        self.ffi.cdef("""
            size_t ggml_quantize_chunk(int type, const float * src, void * dst, int64_t start,
                                       int64_t nrows, int64_t n_per_row, const float * imatrix);
            void ggml_quantize_init(int type);
            size_t ggml_row_size(int type, int64_t ne);
        """)
        self.lib_path = Path(lib_dir) / "libggml-base.so"
        self.lib = self.ffi.dlopen(str(self.lib_path))

    def init(self, type_id: int) -> None:
        """The type's lookup tables (IQ types); quantize does it too, a benchmark does it before timing."""
        self.lib.ggml_quantize_init(type_id)

    def quantize(self, x: np.ndarray, type_id: int, imatrix: np.ndarray | None = None,
                 pool: ThreadPoolExecutor | None = None, nthreads: int = 1) -> np.ndarray:
        """(rows, cols) float32 -> (rows, row bytes) uint8; nthreads > 1: row chunks, one call per pool thread."""
        x = np.ascontiguousarray(x, dtype=np.float32)  # no copy when it already is
        im_arr = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        self.init(type_id)
        rows, cols = x.shape
        out = np.empty((rows, self.lib.ggml_row_size(type_id, cols)), dtype=np.uint8)
        src = self.ffi.cast("float *", x.ctypes.data)
        dst = self.ffi.cast("void *", out.ctypes.data)
        im = self.ffi.NULL if im_arr is None else self.ffi.cast("float *", im_arr.ctypes.data)
        fn = self.lib.ggml_quantize_chunk
        if nthreads <= 1 or pool is None:
            fn(type_id, src, dst, 0, rows, cols, im)
            return out
        per = -(-rows // nthreads)
        # ggml_quantize_chunk reads src + start and writes dst + (start / n_per_row) * row_size itself
        futs = [pool.submit(fn, type_id, src, dst, r0 * cols, min(per, rows - r0), cols, im)
                for r0 in range(0, rows, per)]
        for f in futs:
            f.result()
        return out
