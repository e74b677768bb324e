"""The native codec on the GPU (native/codec_cuda.cu, built by tools/build/build_cuda.sh), for torch CUDA tensors.

Same functions and conventions as formats/codec.py, and the same bytes: the CUDA kernels run the C codec's
own per-block functions (native/blocks_*.h). Data stays on the device: pointers of CUDA tensors go straight
to the kernels, queued on torch's current stream of the tensor's device (no host round trip, no sync,
except pack(), which waits for its code-range check).

    from qrealign_gguf.formats import cuda_codec
    blocks = cuda_codec.quantize_tensor("Q4_K", w_cuda, imatrix_cuda)   # uint8 CUDA tensor (rows, row_bytes)
    data = cuda_codec.quantize("Q4_K", w_cuda, imatrix)                 # the same, as a numpy array
    data = cuda_codec.encode("Q4_K", w, imatrix, device="auto")        # GPU if usable, else the C codec

The library is loaded with cffi in ABI mode (no compiler needed at import); when it is not built, or no
GPU is visible, the functions raise CudaUnavailable with the reason.
"""
from __future__ import annotations

import os
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .types import QType, qtype as _lookup

if TYPE_CHECKING:  # torch is imported lazily: the CPU path must not pay for it
    import torch

# keep in sync with native/qrealign_cuda.h (tests/test_cuda_codec.py checks it)
CDEF = """
#define QR_E_CUDA -5
int qr_cuda_available(void);
const char *qr_cuda_last_error(void);
int qr_cuda_quantize(int type, const float *src, void *dst, int64_t nrows, int64_t ncols,
                     const float *imatrix, void *stream);
int qr_cuda_dequantize(int type, const void *src, float *dst, int64_t nrows, int64_t ncols, void *stream);
int qr_cuda_pack(int type, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,
                 const uint8_t *mn, void *dst, int64_t nrows, int64_t ncols, void *stream);
int qr_cuda_unpack(int type, const void *src, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc,
                   uint8_t *mn, int64_t nrows, int64_t ncols, void *stream);
"""
LIB_NAME = "libqrealign_cuda.so"
_ERRORS = {-1: "unsupported type", -2: "row length not a multiple of the block size",
           -3: "bad argument (a code out of range, or a missing array)", -4: "out of memory"}


class CudaUnavailable(RuntimeError):
    """The CUDA codec cannot run here: library not built, or no CUDA device / CUDA torch."""


def library_path() -> Path:
    """Where the library is looked for: $QREALIGN_CUDA_LIB, else qrealign_gguf/_cuda/libqrealign_cuda.so."""
    env = os.environ.get("QREALIGN_CUDA_LIB")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "_cuda" / LIB_NAME


@functools.lru_cache(maxsize=1)  # one dlopen per process; a missing library raises (and is not cached)
def _load():  # noqa: ANN202 - (ffi, lib)
    path = library_path()
    if not path.is_file():
        raise CudaUnavailable(
            f"CUDA codec library not built ({path} is missing): build it with `make install` or "
            "`bash tools/build/build_cuda.sh` on a machine with nvcc (CUDA toolkit), or use --device cpu")
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(str(path))


def _reason() -> str | None:
    """Why the CUDA codec cannot run, or None if it can."""
    try:
        ffi, lib = _load()
    except (CudaUnavailable, OSError) as exc:
        return str(exc)
    if not lib.qr_cuda_available():  # before torch: a CPU-only machine must not pay torch's import
        return f"the CUDA codec sees no usable device: {ffi.string(lib.qr_cuda_last_error()).decode()}"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device (CPU-only torch build, or no GPU visible)"
    return None


def available() -> bool:
    """True when quantize()/dequantize()/pack() can run on a GPU here."""
    return _reason() is None


def resolve_device(name: str = "auto") -> str:
    """--device for encoding: auto -> "cuda" if the CUDA codec can run, else "cpu"; "cuda" raises
    CudaUnavailable with the reason when it cannot."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {name!r}: use auto, cpu or cuda")
    if name == "cpu":
        return "cpu"
    reason = _reason()
    if reason is None:
        return "cuda"
    if name == "cuda":
        raise CudaUnavailable(reason)
    return "cpu"


# ---- helpers ----------------------------------------------------------------------------------------

def _t(t: QType | str) -> QType:
    t = _lookup(t) if isinstance(t, str) else t
    if not t.native:
        raise ValueError(f"{t.name} is a plain cast, not a block codec")
    return t


def _check(rc: int, what: str) -> None:
    if rc == 0:
        return
    ffi, lib = _load()
    if rc == -5:
        raise RuntimeError(f"{what}: CUDA error: {ffi.string(lib.qr_cuda_last_error()).decode()}")
    raise ValueError(f"{what}: {_ERRORS.get(rc, f'error {rc}')}")


def _dev(x: torch.Tensor, what: str) -> torch.Tensor:
    if not x.is_cuda:
        raise ValueError(f"{what} must be a CUDA tensor (got device {x.device})")
    return x.contiguous()


def _same_device(ref: torch.Tensor, x: torch.Tensor | None, what: str) -> torch.Tensor | None:
    if x is None:
        return None
    x = _dev(x, what)
    if x.device != ref.device:
        raise ValueError(f"{what} is on {x.device}, the weights on {ref.device}")
    return x


def _ptr(ffi, x: torch.Tensor | None, ctype: str):  # noqa: ANN001, ANN202 - cffi pointer
    return ffi.NULL if x is None else ffi.cast(ctype, x.data_ptr())


def _stream(device: torch.device):  # noqa: ANN202
    import torch

    ffi, _ = _load()
    return ffi.cast("void *", torch.cuda.current_stream(device).cuda_stream)


def _bits16(x: torch.Tensor | None, what: str, ref: torch.Tensor) -> torch.Tensor | None:
    """fp16 parameters as their bit patterns (float16 tensors, or int16/uint16 bits as they are)."""
    import torch

    x = _same_device(ref, x, what)
    if x is None:
        return None
    if x.dtype == torch.float16:
        return x.view(torch.int16)
    if x.dtype in (torch.int16, getattr(torch, "uint16", torch.int16)):
        return x
    return x.to(torch.float16).view(torch.int16)  # float32 scales: rounded to fp16 (RNE), as numpy does


# ---- codec ------------------------------------------------------------------------------------------

def quantize_tensor(t: QType | str, x: torch.Tensor, imatrix: torch.Tensor | np.ndarray | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Encode the rows of a CUDA tensor (..., cols) on its device; returns uint8 (rows, row_bytes) on that
    device, byte-identical with codec.quantize of the same float32 values. imatrix: cols importance weights."""
    import torch

    ffi, lib = _load()
    t = _t(t)
    x = _dev(x, "weights")
    if x.dtype != torch.float32:
        x = x.float()
    x = x.reshape(1, -1) if x.dim() == 1 else x.reshape(-1, x.shape[-1])
    rows, cols = x.shape
    im = None
    if imatrix is not None:
        im = torch.as_tensor(imatrix, dtype=torch.float32, device=x.device).contiguous()
        if im.numel() != cols:
            raise ValueError(f"imatrix has {im.numel()} entries, rows have {cols} columns")
    shape = (rows, t.row_bytes(cols))
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8, device=x.device)
    elif out.shape != shape or out.dtype != torch.uint8 or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 tensor {shape} on {x.device}")
    if rows == 0:
        return out
    with torch.cuda.device(x.device):
        _check(lib.qr_cuda_quantize(t.id, _ptr(ffi, x, "float *"), _ptr(ffi, out, "void *"), rows, cols,
                                    _ptr(ffi, im, "float *"), _stream(x.device)), f"quantize {t.name}")
    return out


def quantize(t: QType | str, x: torch.Tensor, imatrix: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """quantize_tensor, copied to the host: uint8 numpy (rows, row_bytes), as codec.quantize returns."""
    return quantize_tensor(t, x, imatrix).cpu().numpy()


def encode(t: QType | str, x: torch.Tensor | np.ndarray, imatrix: torch.Tensor | np.ndarray | None = None,
           device: str = "auto") -> np.ndarray:
    """Encode on the GPU or the CPU (resolve_device(device)); the bytes are the same either way."""
    import torch

    if resolve_device(device) == "cuda":
        xt = torch.as_tensor(x, dtype=torch.float32)
        return quantize(t, xt if xt.is_cuda else xt.cuda(), imatrix)
    from . import codec

    xa = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x
    im = imatrix.detach().float().cpu().numpy() if isinstance(imatrix, torch.Tensor) else imatrix
    return codec.quantize(xa, t, imatrix=im)


def dequantize(data: torch.Tensor, t: QType | str, cols: int) -> torch.Tensor:
    """Decode packed rows (uint8 CUDA tensor) to float32 (rows, cols) on its device, as ggml does."""
    import torch

    ffi, lib = _load()
    t = _t(t)
    if cols <= 0 or cols % t.block_size:
        raise ValueError(f"{t.name}: row length {cols} is not a multiple of the block size {t.block_size}")
    data = _dev(data, "data")
    if data.dtype != torch.uint8:
        raise ValueError("data must be uint8")
    rows = data.numel() // t.row_bytes(cols)
    out = torch.empty((rows, cols), dtype=torch.float32, device=data.device)
    if rows == 0:
        return out
    with torch.cuda.device(data.device):
        _check(lib.qr_cuda_dequantize(t.id, _ptr(ffi, data, "void *"), _ptr(ffi, out, "float *"), rows, cols,
                                      _stream(data.device)), f"dequantize {t.name}")
    return out


def pack(t: QType | str, q: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor | None = None,
         sc: torch.Tensor | None = None, mn: torch.Tensor | None = None) -> torch.Tensor:
    """Write exactly these codes and scales (codec.pack's BlockParams, as CUDA tensors): q (rows, cols)
    uint8, d/dmin (rows, nblocks) float16 (or their int16 bits), sc/mn (rows, nblocks, nsub) uint8.
    Returns uint8 (rows, row_bytes) on the device; ValueError if a code is out of the type's range."""
    import torch

    ffi, lib = _load()
    t = _t(t)
    if t.n_outliers:
        raise ValueError(f"pack {t.name}: a type with outliers; pack it with the C codec (codec.pack)")
    q = _dev(q, "q")
    if q.dtype != torch.uint8 or q.dim() != 2:
        raise ValueError("q must be a 2-D uint8 tensor")
    rows, cols = q.shape
    u8 = lambda a, w: None if a is None else _same_device(q, a, w).to(torch.uint8)  # noqa: E731
    dd, dm, s, m = _bits16(d, "d", q), _bits16(dmin, "dmin", q), u8(sc, "sc"), u8(mn, "mn")
    if cols <= 0 or cols % t.block_size:
        raise ValueError(f"{t.name}: row length {cols} is not a multiple of the block size {t.block_size}")
    nb = cols // t.block_size
    sizes = {"d": (dd, rows * nb), "dmin": (dm, rows * nb), "sc": (s, rows * nb * t.nsub), "mn": (m, rows * nb * t.nsub)}
    for name, (a, n) in sizes.items():  # the kernels trust the sizes: check them here
        if a is not None and a.numel() != n:
            raise ValueError(f"pack {t.name}: {name} has {a.numel()} entries, expected {n}")
    out = torch.empty((rows, t.row_bytes(cols)), dtype=torch.uint8, device=q.device)
    if rows == 0:
        return out
    with torch.cuda.device(q.device):
        _check(lib.qr_cuda_pack(t.id, _ptr(ffi, q, "uint8_t *"), _ptr(ffi, dd, "uint16_t *"),
                                _ptr(ffi, dm, "uint16_t *"), _ptr(ffi, s, "uint8_t *"), _ptr(ffi, m, "uint8_t *"),
                                _ptr(ffi, out, "void *"), rows, cols, _stream(q.device)), f"pack {t.name}")
    return out


def unpack(data: torch.Tensor, t: QType | str, cols: int) -> dict[str, torch.Tensor | None]:
    """Read codes and scales back out of packed rows: {"q", "d" (float16), "dmin", "sc", "mn"} on the device."""
    import torch

    ffi, lib = _load()
    t = _t(t)
    if t.n_outliers:
        raise ValueError(f"unpack {t.name}: a type with outliers; unpack it with the C codec (codec.unpack)")
    if cols <= 0 or cols % t.block_size:
        raise ValueError(f"{t.name}: row length {cols} is not a multiple of the block size {t.block_size}")
    data = _dev(data, "data")
    dev = data.device
    rows, nb = data.numel() // t.row_bytes(cols), cols // t.block_size
    p = {"q": torch.empty((rows, cols), dtype=torch.uint8, device=dev),
         "d": torch.empty((rows, nb), dtype=torch.float16, device=dev),
         "dmin": torch.empty((rows, nb), dtype=torch.float16, device=dev) if t.has_min else None,
         "sc": torch.empty((rows, nb, t.nsub), dtype=torch.uint8, device=dev) if t.nsub else None,
         "mn": torch.empty((rows, nb, t.nsub), dtype=torch.uint8, device=dev) if t.has_min and t.nsub else None}
    if rows == 0:
        return p
    with torch.cuda.device(dev):
        _check(lib.qr_cuda_unpack(t.id, _ptr(ffi, data, "void *"), _ptr(ffi, p["q"], "uint8_t *"),
                                  _ptr(ffi, p["d"], "uint16_t *"), _ptr(ffi, p["dmin"], "uint16_t *"),
                                  _ptr(ffi, p["sc"], "uint8_t *"), _ptr(ffi, p["mn"], "uint8_t *"), rows, cols,
                                  _stream(dev)), f"unpack {t.name}")
    return p
