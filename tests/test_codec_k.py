"""K-quant codecs (Q2_K Q3_K Q4_K Q5_K Q6_K) against the oracles.

Quantize: byte-identical with libggml's ggml_quantize_chunk, round-to-nearest and importance-weighted.
Dequantize: identical with gguf-py's reference dequantizer, and with the code convention of qrealign.h.
Pack/unpack: exact inverses; pack refuses codes outside the type's range.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from qrealign_gguf.formats import codec
from qrealign_gguf.formats.types import QType, qtype

from conftest import adversarial_rows

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LENGTHS = [256, 512, 4096]
# exclusive upper bounds of the codes (qrealign.h); Q6_K scales are int8 as uint8, so every byte is valid
Q_LIMIT = {"Q2_K": 4, "Q3_K": 8, "Q4_K": 16, "Q5_K": 32, "Q6_K": 64}
SC_LIMIT = {"Q2_K": 16, "Q3_K": 64, "Q4_K": 64, "Q5_K": 64, "Q6_K": 256}
MN_LIMIT = {"Q2_K": 16, "Q4_K": 64, "Q5_K": 64}


def _inputs(cols: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    extremes = rng.standard_normal((5, cols)).astype(np.float32)
    extremes[0] *= 1e37                      # scales overflow fp16
    extremes[1] *= 1e6
    extremes[2, 1::2] = -0.0                 # signed zeros
    extremes[3, ::3], extremes[3, 1::3] = 3.4e38, -3.4e38  # max - min overflows float32
    extremes[4, ::16] = 0.0                  # sparse zeros
    return {
        "normal": rng.standard_normal((4, cols)).astype(np.float32),
        "adversarial": adversarial_rows(cols, rng),
        # LLM-like weights: heavy-tailed, small, per-row scale spread, a few hot input channels
        "student_t": (rng.standard_t(3, (16, cols)) * 0.02 * rng.uniform(0.2, 3, (16, 1))
                      * np.where(rng.random(cols) < 0.01, 8.0, 1.0)).astype(np.float32),
        "ties": (rng.integers(-40, 40, (4, cols)) / 4).astype(np.float32),  # exact rounding ties
        "extremes": extremes,
    }


def _imatrices(cols: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    # activation statistics: positive, spread over orders of magnitude, a few hot channels
    lognormal = rng.lognormal(0.0, 1.5, cols) * np.where(rng.random(cols) < 0.02, 50.0, 1.0)
    dead = rng.random(cols) + 0.01
    dead[rng.random(cols) < 0.1] = 0.0  # channels never activated
    return {"uniform": (rng.random(cols) + 0.01).astype(np.float32),
            "lognormal": lognormal.astype(np.float32), "dead_channels": dead.astype(np.float32)}


def _first_diff(ours: np.ndarray, ref: np.ndarray, t: QType) -> str:
    row, col = np.argwhere(ours != ref)[0]
    return f"row {row}, block {col // t.type_size}, byte {col % t.type_size}: {ours[row, col]} != {ref[row, col]}"


CASES = [(t, cols) for t in TYPES for cols in LENGTHS]


@pytest.mark.parametrize(("name", "cols"), CASES)
def test_rtn_matches_ggml(ggml, name: str, cols: int) -> None:
    t = qtype(name)
    for kind, x in _inputs(cols, cols).items():
        ours, ref = codec.quantize(x, t), ggml.quantize(x, t.id)
        assert ours.tobytes() == ref.tobytes(), f"{name} {kind} cols={cols}: {_first_diff(ours, ref, t)}"


@pytest.mark.parametrize(("name", "cols"), CASES)
def test_imatrix_matches_ggml(ggml, name: str, cols: int) -> None:
    t = qtype(name)
    for iname, im in _imatrices(cols, cols).items():
        for kind, x in _inputs(cols, cols).items():
            ours, ref = codec.quantize(x, t, imatrix=im), ggml.quantize(x, t.id, im)
            assert ours.tobytes() == ref.tobytes(), \
                f"{name} {kind} imatrix={iname} cols={cols}: {_first_diff(ours, ref, t)}"


@pytest.mark.parametrize("name", TYPES)
def test_imatrix_changes_the_result(name: str) -> None:
    """The importance path is really taken: it differs from RTN and lowers the importance-weighted error."""
    t, rng = qtype(name), np.random.default_rng(7)
    x = (rng.standard_t(3, (32, 1024)) * 0.02).astype(np.float32)
    im = (rng.lognormal(0.0, 1.5, 1024) * np.where(rng.random(1024) < 0.05, 100.0, 1.0)).astype(np.float32)
    rtn, imq = codec.quantize(x, t), codec.quantize(x, t, imatrix=im)
    assert rtn.tobytes() != imq.tobytes()
    err = lambda q: float((im * (codec.dequantize(q, t, 1024) - x) ** 2).sum())  # noqa: E731
    assert err(imq) < err(rtn)


@pytest.mark.parametrize(("name", "cols"), CASES)
def test_dequantize_matches_gguf_py(name: str, cols: int) -> None:
    t = qtype(name)
    for kind, x in _inputs(cols, cols).items():
        if kind == "extremes":
            continue  # inf * 0 gives NaNs whose payload is not part of either reference
        q = codec.quantize(x, t)
        ours, ref = codec.dequantize(q, t, cols), gguf_dequantize(q, t.ggml).reshape(-1, cols)
        assert ours.view(np.uint32).tobytes() == ref.view(np.uint32).tobytes(), f"{name} {kind} cols={cols}"


def _random_params(t: QType, rows: int, cols: int, seed: int) -> codec.BlockParams:
    """Every code value in range, finite fp16 scales (including negative and subnormal ones)."""
    rng = np.random.default_rng(seed)
    nb = cols // 256
    f16 = lambda: (rng.standard_normal((rows, nb)) * np.exp2(rng.integers(-20, 8, (rows, nb)))).astype(np.float16)  # noqa: E731
    u8 = lambda hi, shape: rng.integers(0, hi, shape).astype(np.uint8)  # noqa: E731
    return codec.BlockParams(
        q=u8(Q_LIMIT[t.name], (rows, cols)), d=f16(), dmin=f16() if t.has_min else None,
        sc=u8(SC_LIMIT[t.name], (rows, nb, t.nsub)),
        mn=u8(MN_LIMIT[t.name], (rows, nb, t.nsub)) if t.has_min else None)


def _formula(t: QType, p: codec.BlockParams) -> np.ndarray:
    """qrealign.h's code convention, in float32 with ggml's operation order: (d*s)*q [- dmin*m]."""
    rows, cols = p.q.shape
    sub = 256 // t.nsub
    sc = p.sc.astype(np.int32)
    s = {"Q3_K": sc - 32, "Q6_K": p.sc.view(np.int8).astype(np.int32)}.get(t.name, sc).astype(np.float32)
    dl = p.d.astype(np.float32)[:, :, None] * s
    q = p.q.reshape(rows, -1, t.nsub, sub).astype(np.int32) - {"Q3_K": 4, "Q6_K": 32}.get(t.name, 0)
    y = dl[..., None] * q.astype(np.float32)
    if t.has_min:
        y = y - (p.dmin.astype(np.float32)[:, :, None] * p.mn.astype(np.float32))[..., None]
    return y.reshape(rows, cols).astype(np.float32)


@pytest.mark.parametrize("name", TYPES)
def test_pack_unpack_roundtrip(name: str) -> None:
    t, cols = qtype(name), 1024
    # params -> bytes -> params: every field survives exactly
    p = _random_params(t, 6, cols, 3)
    data = codec.pack(t, p)
    back = codec.unpack(data, t, cols)
    for field in ("q", "d", "dmin", "sc", "mn"):
        a, b = getattr(p, field), getattr(back, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), f"{name} {field}"
    # the codes mean what qrealign.h says, and both decoders agree on arbitrary code combinations
    ours, ref = codec.dequantize(data, t, cols), gguf_dequantize(data, t.ggml).reshape(-1, cols)
    assert ours.view(np.uint32).tobytes() == ref.view(np.uint32).tobytes()
    assert ours.view(np.uint32).tobytes() == _formula(t, p).view(np.uint32).tobytes()
    # bytes -> params -> bytes on quantizer output
    for x in _inputs(cols, 5).values():
        q = codec.quantize(x, t)
        assert codec.pack(t, codec.unpack(q, t, cols)).tobytes() == q.tobytes()


@pytest.mark.parametrize("name", TYPES)
def test_pack_rejects_out_of_range(name: str) -> None:
    t, cols = qtype(name), 512
    good = _random_params(t, 2, cols, 11)
    codec.pack(t, good)

    def bad(field: str, index: tuple[int, ...], value: int) -> codec.BlockParams:
        p = codec.BlockParams(**{f: None if getattr(good, f) is None else getattr(good, f).copy()
                                 for f in ("q", "d", "dmin", "sc", "mn")})
        getattr(p, field)[index] = value
        return p

    with pytest.raises(ValueError):
        codec.pack(t, bad("q", (1, 300), Q_LIMIT[name]))
    with pytest.raises(ValueError):
        codec.pack(t, bad("q", (0, 0), 255))
    if SC_LIMIT[name] < 256:
        with pytest.raises(ValueError):
            codec.pack(t, bad("sc", (1, 1, t.nsub - 1), SC_LIMIT[name]))
    if name in MN_LIMIT:
        with pytest.raises(ValueError):
            codec.pack(t, bad("mn", (0, 1, 0), MN_LIMIT[name]))
        with pytest.raises(ValueError):  # a type with mins needs them
            codec.pack(t, codec.BlockParams(q=good.q, d=good.d, dmin=good.dmin, sc=good.sc, mn=None))
    with pytest.raises(ValueError):  # K-quants always need sub-block scales
        codec.pack(t, codec.BlockParams(q=good.q, d=good.d, dmin=good.dmin, sc=None, mn=good.mn))


@pytest.mark.parametrize("name", TYPES)
def test_threads_identical(name: str) -> None:
    t, rng = qtype(name), np.random.default_rng(13)
    x = (rng.standard_t(3, (37, 768)) * 0.02).astype(np.float32)
    im = rng.lognormal(0.0, 1.0, 768).astype(np.float32)
    for imatrix in (None, im):
        one = codec.quantize(x, t, imatrix=imatrix, threads=1)
        assert codec.quantize(x, t, imatrix=imatrix, threads=2).tobytes() == one.tobytes()
        assert codec.quantize(x, t, imatrix=imatrix, threads=0).tobytes() == one.tobytes()
        assert codec.dequantize(one, t, 768, threads=2).tobytes() == codec.dequantize(one, t, 768, threads=1).tobytes()


@pytest.mark.parametrize("name", TYPES)
def test_rejects_partial_superblocks(name: str) -> None:
    t = qtype(name)
    with pytest.raises(ValueError):
        codec.quantize(np.zeros((2, 384), np.float32), t)
