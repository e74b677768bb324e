"""cffi build script for qrealign_gguf._native (API mode, compiled at install time).

The C declarations come straight from native/qrealign.h (between the CFFI markers), so the header
is the single source of truth for the ABI.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "qrealign.h"
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))


def _cdef_text() -> str:
    text = HEADER.read_text()
    body = text.split("/* CFFI-BEGIN */", 1)[1].split("/* CFFI-END */", 1)[0]
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)  # cffi's parser takes no comments
    return body


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "qrealign_gguf._native",
    '#include "qrealign.h"',
    sources=SOURCES,
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    # -ffp-contract=off: no fused multiply-add, so float results match ggml's reference C bit for bit.
    extra_compile_args=["-O3", "-std=c11", "-pthread", "-ffp-contract=off", "-fno-fast-math",
                        *os.environ.get("QREALIGN_CFLAGS", "").split()],
    extra_link_args=["-pthread", "-lm"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
