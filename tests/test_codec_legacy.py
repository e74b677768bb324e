"""Legacy block codecs (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL) against the oracles.

Quantize: byte-identical with libggml's ggml_quantize_chunk, round-to-nearest and importance-weighted.
Dequantize: identical with gguf-py's reference dequantizer. Pack/unpack: exact inverses.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from qrealign_gguf.formats import codec
from qrealign_gguf.formats.types import qtype

from conftest import adversarial_rows

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]
CODE_LIMIT = {"Q4_0": 16, "Q4_1": 16, "Q5_0": 32, "Q5_1": 32, "IQ4_NL": 16}  # Q8_0: every byte is valid
LENGTHS = [32, 256, 896, 4096]


def _inputs(cols: int, seed: int, extremes: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {
        "normal": rng.standard_normal((4, cols)).astype(np.float32),
        "adversarial": adversarial_rows(cols, rng),
        # LLM-like weights: heavy-tailed, small, with per-row scale spread
        "student_t": (rng.standard_t(3, (16, cols)) * 0.02 * rng.uniform(0.2, 3, (16, 1))).astype(np.float32),
        # on a quarter grid: many exact rounding ties
        "ties": (rng.integers(-40, 40, (4, cols)) / 4).astype(np.float32),
    }
    if extremes:  # scales that overflow fp16 or float32 in (max - min), signed zeros
        x = rng.standard_normal((4, cols)).astype(np.float32)
        x[0] *= 1e37
        x[1] *= 1e6
        x[2, 1::2] = -0.0
        x[3, ::3] = 3.4e38
        x[3, 1::3] = -3.4e38
        inputs["extremes"] = x
    return inputs


def _imatrix(cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # activation statistics are positive, spread over orders of magnitude, with a few hot channels
    im = rng.lognormal(0.0, 1.5, cols) * np.where(rng.random(cols) < 0.02, 50.0, 1.0)
    return im.astype(np.float32)


CASES = [(t, cols) for t in TYPES for cols in LENGTHS]


@pytest.mark.parametrize(("name", "cols"), CASES)
def test_rtn_matches_ggml(ggml, name: str, cols: int) -> None:
    t = qtype(name)
    for kind, x in _inputs(cols, cols, extremes=True).items():
        ours, ref = codec.quantize(x, t), ggml.quantize(x, t.id)
        assert ours.tobytes() == ref.tobytes(), f"{name} {kind} cols={cols}: {_first_diff(ours, ref, t)}"


@pytest.mark.parametrize(("name", "cols"), CASES)
def test_imatrix_matches_ggml(ggml, name: str, cols: int) -> None:
    t = qtype(name)
    im = _imatrix(cols, cols + 1)
    for kind, x in _inputs(cols, cols + 2, extremes=True).items():
        ours, ref = codec.quantize(x, t, imatrix=im), ggml.quantize(x, t.id, imatrix=im)
        assert ours.tobytes() == ref.tobytes(), f"{name} {kind} cols={cols}: {_first_diff(ours, ref, t)}"


@pytest.mark.parametrize("name", TYPES)
def test_imatrix_lowers_weighted_error(name: str) -> None:
    """The search must pay off where it is scored: importance-weighted squared error (Q8_0 ignores it)."""
    t, cols = qtype(name), 4096
    x = _inputs(cols, 7)["student_t"]
    im = _imatrix(cols, 8)
    err = lambda q: float(np.sum(im * (codec.dequantize(q, t, cols) - x) ** 2))  # noqa: E731
    rtn, weighted = err(codec.quantize(x, t)), err(codec.quantize(x, t, imatrix=im))
    if name == "Q8_0":
        assert weighted == rtn
    else:
        assert weighted < rtn


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf_py(name: str) -> None:
    t, cols = qtype(name), 896
    for kind, x in _inputs(cols, 3).items():
        for im in (None, _imatrix(cols, 4)):
            data = codec.quantize(x, t, imatrix=im)
            ours = codec.dequantize(data, t, cols)
            ref = gguf_dequantize(data, GGMLQuantizationType(t.id)).reshape(ours.shape)
            np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32),
                                          err_msg=f"{name} {kind}")


@pytest.mark.parametrize("name", TYPES)
def test_pack_unpack_roundtrip(name: str) -> None:
    t, cols = qtype(name), 256
    for x in _inputs(cols, 5).values():
        data = codec.quantize(x, t)
        p = codec.unpack(data, t, cols)
        assert (p.dmin is not None) == t.has_min and p.sc is None and p.mn is None
        assert codec.pack(t, p).tobytes() == data.tobytes()


@pytest.mark.parametrize("name", TYPES)
def test_pack_writes_given_codes(name: str) -> None:
    """Arbitrary codes and fp16 patterns (negative, subnormal, inf) survive pack -> unpack bit for bit,
    and dequantize applies ggml's formula to them."""
    t, rows, cols = qtype(name), 3, 128
    rng = np.random.default_rng(11)
    nb = cols // 32
    q = rng.integers(0, CODE_LIMIT.get(name, 256), (rows, cols)).astype(np.uint8)
    bits = rng.integers(0, 1 << 16, (rows, nb)).astype(np.uint16)
    bits[0, :3] = [0x0001, 0x8000, 0x7C00][:nb]  # subnormal, -0, inf
    d = bits.view(np.float16)
    dmin = rng.standard_normal((rows, nb)).astype(np.float16) if t.has_min else None
    data = codec.pack(t, codec.BlockParams(q=q, d=d, dmin=dmin))
    back = codec.unpack(data, t, cols)
    np.testing.assert_array_equal(back.q, q)
    np.testing.assert_array_equal(back.d.view(np.uint16), d.view(np.uint16))
    if t.has_min:
        np.testing.assert_array_equal(back.dmin.view(np.uint16), dmin.view(np.uint16))
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf_dequantize(data, GGMLQuantizationType(t.id)).reshape(rows, cols).astype(np.float32)
    np.testing.assert_array_equal(codec.dequantize(data, t, cols), ref)


@pytest.mark.parametrize("name", [n for n in TYPES if n in CODE_LIMIT])
def test_pack_rejects_out_of_range_codes(name: str) -> None:
    t, cols = qtype(name), 64
    q = np.zeros((2, cols), np.uint8)
    q[1, 40] = CODE_LIMIT[name]
    d = np.ones((2, 2), np.float16)
    dmin = np.zeros((2, 2), np.float16) if t.has_min else None
    with pytest.raises(ValueError, match="bad argument"):
        codec.pack(t, codec.BlockParams(q=q, d=d, dmin=dmin))
    q[1, 40] = CODE_LIMIT[name] - 1
    codec.pack(t, codec.BlockParams(q=q, d=d, dmin=dmin))  # the top code itself is fine


@pytest.mark.parametrize("name", [n for n in TYPES if qtype(n).has_min])
def test_pack_requires_dmin(name: str) -> None:
    with pytest.raises(ValueError, match="bad argument"):
        codec.pack(name, codec.BlockParams(q=np.zeros((1, 32), np.uint8), d=np.ones((1, 1), np.float16)))


@pytest.mark.parametrize("name", TYPES)
def test_threads_identical(name: str) -> None:
    t, cols = qtype(name), 512
    x = np.random.default_rng(9).standard_normal((37, cols)).astype(np.float32)
    im = _imatrix(cols, 10)
    for imx in (None, im):
        one = codec.quantize(x, t, imatrix=imx, threads=1)
        assert codec.quantize(x, t, imatrix=imx, threads=2).tobytes() == one.tobytes()
        np.testing.assert_array_equal(codec.dequantize(one, t, cols, threads=2), codec.dequantize(one, t, cols, threads=1))


@pytest.mark.parametrize("name", TYPES)
def test_bad_row_length(name: str) -> None:
    with pytest.raises(ValueError, match="multiple of the block size"):
        codec.quantize(np.zeros((1, 48), np.float32), name)


def _first_diff(ours: np.ndarray, ref: np.ndarray, t) -> str:  # noqa: ANN001
    a, b = ours.reshape(-1, t.type_size), ref.reshape(-1, t.type_size)
    bad = np.flatnonzero((a != b).any(axis=1))
    if not bad.size:
        return "shapes differ"
    i = int(bad[0])
    return f"{bad.size} of {len(a)} blocks differ; first #{i}: ours {a[i].tobytes().hex()} ggml {b[i].tobytes().hex()}"
