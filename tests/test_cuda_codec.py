"""CUDA codec (native/codec_cuda.cu, formats/cuda_codec.py): byte-identical with the C codec.

On a machine with a CUDA device (and the library built): quantize (RTN and imatrix, random, LLM-like and
adversarial rows), dequantize, pack and unpack of every type against formats/codec.py (which the oracle
tests prove equal to ggml). Without one those tests skip; what still runs everywhere:
- the shared-header numerics that only the device build uses (QR_PORTABLE_NUMERICS: x86 float->int and
  NaN behaviour emulated), compiled on the host and compared with the C codec on the oracle inputs;
- the wrapper's declarations against native/qrealign_cuda.h, its message when the library is missing;
- with nvcc: the CUDA C++ build of the block functions run on the host (tests/native/cuda_host_harness.cu,
  same device-numerics helpers) against the C codec, and a compile of native/codec_cuda.cu for sm_80.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qrealign_gguf.formats import codec, cuda_codec
from qrealign_gguf.formats.types import qtype

import test_codec_k as tk
import test_codec_legacy as tl

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "QR5_K128"]  # QR5_K128: qrealign's, a K codec on 128 blocks
TYPES = LEGACY + KQUANTS
ENCODE_TYPES = TYPES + ["QR4_KO"]  # the custom type: quantize/dequantize on the GPU, pack/unpack C only (outliers)
CODE_LIMIT = {"Q4_0": 16, "Q4_1": 16, "Q5_0": 32, "Q5_1": 32, "Q8_0": 256, "IQ4_NL": 16, **tk.Q_LIMIT, "QR5_K128": 32}


def _cases(name: str) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(label, rows, imatrix or None) for a type: the oracle tests' input sets, RTN and imatrix."""
    out: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    if name in LEGACY:
        for cols in (32, 256, 896):
            for kind, x in tl._inputs(cols, cols, extremes=True).items():
                out.append((f"{kind} cols={cols}", x, None))
                out.append((f"{kind} cols={cols} imatrix", x, tl._imatrix(cols, cols + 7)))
    else:
        for cols in ((384, 896) if name == "QR5_K128" else (256, 512)):
            for kind, x in tk._inputs(cols, cols).items():
                out.append((f"{kind} cols={cols}", x, None))
                for iname, im in tk._imatrices(cols, cols).items():
                    out.append((f"{kind} cols={cols} imatrix={iname}", x, im))
    return out


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()  # NaN-safe: compares bit patterns


# ---- runs everywhere -----------------------------------------------------------------------------

def test_cdef_matches_header() -> None:
    header = (NATIVE / "qrealign_cuda.h").read_text()
    body = header.split("/* CFFI-BEGIN */", 1)[1].split("/* CFFI-END */", 1)[0]
    norm = lambda s: re.sub(r"\s+", " ", re.sub(r"/\*.*?\*/", "", s, flags=re.S)).strip()  # noqa: E731
    assert norm(body) == norm(cuda_codec.CDEF)


def test_missing_library_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QREALIGN_CUDA_LIB", str(tmp_path / "nope.so"))
    cuda_codec._load.cache_clear()  # a real library may already be loaded (failed loads are not cached)
    with pytest.raises(cuda_codec.CudaUnavailable, match="not built"):
        cuda_codec.quantize_tensor("Q4_0", torch.zeros(1, 32))
    assert not cuda_codec.available()
    assert cuda_codec.resolve_device("auto") == "cpu"
    assert cuda_codec.resolve_device("cpu") == "cpu"
    with pytest.raises(cuda_codec.CudaUnavailable, match="tools/build/build_cuda.sh"):
        cuda_codec.resolve_device("cuda")
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    assert _bits(cuda_codec.encode("Q4_K", x, device="auto")) == _bits(codec.quantize(x, "Q4_K"))


@pytest.fixture(scope="module")
def portable(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - the cffi module
    """The C codec built with -DQR_PORTABLE_NUMERICS: the device versions of qr_hd.h's helpers, on the host."""
    spec = importlib.util.spec_from_file_location("qr_build_ffi", NATIVE / "build_ffi.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # type: ignore[union-attr]
    from cffi import FFI

    tmp = tmp_path_factory.mktemp("portable")
    ffi = FFI()
    ffi.cdef(build._cdef_text())
    ffi.set_source("_qr_portable", '#include "qrealign.h"', sources=[str(p) for p in sorted(NATIVE.glob("*.c"))],
                   include_dirs=[str(NATIVE)],
                   extra_compile_args=["-O2", "-std=c11", "-pthread", "-ffp-contract=off", "-fno-fast-math",
                                       "-DQR_PORTABLE_NUMERICS"],
                   extra_link_args=["-pthread", "-lm"])
    so = ffi.compile(tmpdir=str(tmp))
    mspec = importlib.util.spec_from_file_location("_qr_portable", so)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.mark.parametrize("name", ENCODE_TYPES)
def test_portable_numerics_match_c(portable, name: str) -> None:  # noqa: ANN001
    t = qtype(name)
    ffi, lib = portable.ffi, portable.lib
    ptr = lambda a, c: ffi.NULL if a is None else ffi.cast(c, a.ctypes.data)  # noqa: E731
    for label, x, im in _cases(name):
        rows, cols = x.shape
        ref = codec.quantize(x, t, imatrix=im)
        got = np.empty_like(ref)
        imc = None if im is None else np.ascontiguousarray(im, np.float32)
        assert lib.qr_quantize(t.id, ptr(x, "float *"), ptr(got, "void *"), rows, cols, ptr(imc, "float *"), 1) == 0
        assert _bits(got) == _bits(ref), f"{name} {label}: quantize differs"
        deq = np.empty((rows, cols), np.float32)
        assert lib.qr_dequantize(t.id, ptr(ref, "void *"), ptr(deq, "float *"), rows, cols, 1) == 0
        assert _bits(deq) == _bits(codec.dequantize(ref, t, cols)), f"{name} {label}: dequantize differs"


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/native/cuda_host_harness.cu built by nvcc: the CUDA C++ build of the block functions, on the host."""
    exe = tmp_path_factory.mktemp("harness") / "cuda_host_harness"
    r = subprocess.run([NVCC, "-std=c++17", "-O2", f"-I{NATIVE}", "-DQR_PORTABLE_NUMERICS",
                        "-Xcompiler", "-ffp-contract=off", str(ROOT / "tests/native/cuda_host_harness.cu"),
                        "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return exe


@needs_nvcc
@pytest.mark.parametrize("name", ENCODE_TYPES)
def test_nvcc_host_build_matches_c(harness: Path, name: str) -> None:
    t = qtype(name)
    for label, x, im in _cases(name):
        rows, cols = x.shape
        stdin = np.ascontiguousarray(x, np.float32).tobytes()
        if im is not None:
            stdin += np.ascontiguousarray(im, np.float32).tobytes()
        r = subprocess.run([str(harness), str(t.id), str(rows), str(cols), str(int(im is not None))],
                           input=stdin, capture_output=True, timeout=60)
        assert r.returncode == 0, f"{name} {label}: harness exit {r.returncode}"
        ref = codec.quantize(x, t, imatrix=im)
        assert r.stdout[:ref.nbytes] == _bits(ref), f"{name} {label}: quantize differs"
        assert r.stdout[ref.nbytes:] == _bits(codec.dequantize(ref, t, cols)), f"{name} {label}: dequantize differs"


@needs_nvcc
def test_nvcc_compiles() -> None:
    env = {**os.environ, "QREALIGN_CUDA_ARCHS": "80"}
    r = subprocess.run(["bash", str(ROOT / "tools/build/build_cuda.sh"), "--check"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compiled" in r.stdout


# ---- needs a GPU -----------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_ready() -> None:
    reason = cuda_codec._reason()
    if reason is not None:
        pytest.fail(f"a CUDA device is visible but the CUDA codec cannot run: {reason}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ENCODE_TYPES)
def test_quantize_and_dequantize_match_cpu(cuda_ready, name: str) -> None:  # noqa: ANN001
    t = qtype(name)
    for label, x, im in _cases(name):
        ref = codec.quantize(x, t, imatrix=im)
        xd = torch.from_numpy(x).cuda()
        imd = None if im is None else torch.from_numpy(np.ascontiguousarray(im, np.float32)).cuda()
        got = cuda_codec.quantize_tensor(t, xd, imd)
        torch.cuda.synchronize()
        got_np = got.cpu().numpy()
        if _bits(got_np) != _bits(ref):
            row, col = np.argwhere(got_np != ref)[0]
            pytest.fail(f"{name} {label}: row {row} block {col // t.type_size} byte {col % t.type_size}: "
                        f"{got_np[row, col]} != {ref[row, col]}")
        deq = cuda_codec.dequantize(got, t, x.shape[1]).cpu().numpy()
        assert _bits(deq) == _bits(codec.dequantize(ref, t, x.shape[1])), f"{name} {label}: dequantize differs"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", TYPES)
def test_pack_unpack_match_cpu(cuda_ready, name: str) -> None:  # noqa: ANN001
    t = qtype(name)
    rng = np.random.default_rng(7)
    rows, cols = 5, 512
    nb = cols // t.block_size
    p = codec.BlockParams(q=rng.integers(0, CODE_LIMIT[name], (rows, cols), dtype=np.uint8),
                          d=rng.standard_normal((rows, nb)).astype(np.float16))
    if t.has_min:
        p.dmin = rng.standard_normal((rows, nb)).astype(np.float16)
    if t.nsub:
        p.sc = rng.integers(0, tk.SC_LIMIT[name], (rows, nb, t.nsub), dtype=np.uint8)
        if t.has_min:
            p.mn = rng.integers(0, tk.MN_LIMIT[name], (rows, nb, t.nsub), dtype=np.uint8)
    ref = codec.pack(t, p)
    cu = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    got = cuda_codec.pack(t, cu(p.q), cu(p.d), cu(p.dmin), cu(p.sc), cu(p.mn))
    assert _bits(got.cpu().numpy()) == _bits(ref)
    back = cuda_codec.unpack(got, t, cols)
    cpu = codec.unpack(ref, t, cols)
    for key in ("q", "d", "dmin", "sc", "mn"):
        a, b = back[key], getattr(cpu, key)
        assert (a is None) == (b is None), key
        if a is not None:
            assert _bits(a.cpu().numpy()) == _bits(b), f"{name} unpack {key}"
    if CODE_LIMIT[name] < 256:  # out-of-range code: refused like the CPU path
        bad = p.q.copy()
        bad[1, 3] = CODE_LIMIT[name]
        with pytest.raises(ValueError, match="bad argument"):
            cuda_codec.pack(t, cu(bad), cu(p.d), cu(p.dmin), cu(p.sc), cu(p.mn))


@pytest.mark.gpu
@gpu
def test_stream_and_errors(cuda_ready) -> None:  # noqa: ANN001
    x = torch.randn(64, 4096, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = cuda_codec.quantize_tensor("Q4_K", x)
    s.synchronize()
    assert _bits(got.cpu().numpy()) == _bits(codec.quantize(x.cpu().numpy(), "Q4_K"))
    with pytest.raises(ValueError, match="multiple of the block size"):
        cuda_codec.quantize_tensor("Q4_K", torch.zeros(2, 100, device="cuda"))
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_codec.quantize_tensor("Q4_K", torch.zeros(2, 256))
    assert cuda_codec.resolve_device("auto") == "cuda"
    assert cuda_codec.quantize("Q8_0", torch.zeros(0, 64, device="cuda")).shape == (0, 68)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
