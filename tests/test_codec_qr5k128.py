"""QR5_K128 (qrealign's id 241): Q5_K's encoder and layout on 128-weight super-blocks (native/qr_custom.h).

The oracle is our Q5_K codec (byte-identical with ggml's, tests/test_codec_k.py): without an imatrix, Q5_K's
search treats each 32-weight sub-block on its own and then scales the codes by the block's largest scale / min,
so Q5_K on a row [x, x] (each 128 written twice) must decode to exactly QR5_K128's decoding of x.
"""
from __future__ import annotations

import numpy as np
import pytest

from qrealign_gguf.formats import codec
from qrealign_gguf.formats.types import qtype

from conftest import adversarial_rows

T = qtype("QR5_K128")


def _heavy(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3.0, (rows, cols)) * 0.02).astype(np.float32)


def _doubled(x: np.ndarray) -> np.ndarray:
    rows, cols = x.shape
    g = x.reshape(rows, cols // 128, 1, 128)
    return np.ascontiguousarray(np.concatenate([g, g], axis=2).reshape(rows, 2 * cols))


def test_type_table() -> None:
    assert (T.id, T.block_size, T.type_size, T.nsub, T.has_min, T.custom) == (241, 128, 90, 4, True, True)
    assert T.bits_per_weight == 5.625
    x = _heavy(3, 384, 0)
    assert codec.quantize(x, T).shape == (3, 3 * 90)


def test_rtn_is_q5k_on_128_weights() -> None:
    x = _heavy(16, 896, 1)
    ours = codec.dequantize(codec.quantize(x, T), T, 896)
    q5k = codec.dequantize(codec.quantize(_doubled(x), "Q5_K"), "Q5_K", 2 * 896)
    first_half = q5k.reshape(16, 7, 2, 128)[:, :, 0, :].reshape(16, 896)
    np.testing.assert_array_equal(ours.view(np.uint32), first_half.view(np.uint32))


def test_imatrix_search_is_q5k_on_128_weights() -> None:
    """With importance, Q5_K's block statistics (sigma^2, the scale-code fit over the 8 sub-blocks) see both
    copies; they equal the 128's own only up to float rounding, and a last-bit change of the fp16 d re-rounds
    many codes, so the decodings agree in error (measured: 75 % of values identical, error within 1 %)."""
    x = _heavy(32, 384, 2)
    im = np.random.default_rng(3).uniform(0.1, 4.0, 384).astype(np.float32)
    ours = codec.dequantize(codec.quantize(x, T, imatrix=im), T, 384)
    im2 = np.ascontiguousarray(np.concatenate([im.reshape(3, 1, 128)] * 2, axis=1).reshape(768))
    q5k = codec.dequantize(codec.quantize(_doubled(x), "Q5_K", imatrix=im2), "Q5_K", 768)
    ref = q5k.reshape(32, 3, 2, 128)[:, :, 0, :].reshape(32, 384)
    assert np.mean(ours == ref) > 0.5
    err = lambda w: float((((x - w) ** 2) * im).sum())  # noqa: E731
    assert abs(err(ours) - err(ref)) < 0.02 * err(ref)


def test_layout_and_decode() -> None:
    """Bytes sit where native/qr_custom.h says, and dequantization is d*sc*q - dmin*mn in float32."""
    rng = np.random.default_rng(4)
    rows, nb = 3, 2
    p = codec.BlockParams(q=rng.integers(0, 32, (rows, nb * 128), dtype=np.uint8),
                     d=rng.uniform(1e-4, 1e-2, (rows, nb)).astype(np.float16),
                     dmin=rng.uniform(1e-4, 1e-2, (rows, nb)).astype(np.float16),
                     sc=rng.integers(0, 64, (rows, nb, 4), dtype=np.uint8),
                     mn=rng.integers(0, 64, (rows, nb, 4), dtype=np.uint8))
    data = codec.pack(T, p)
    b = data.reshape(rows, nb, 90)[1, 1]
    q, sc, mn = p.q.reshape(rows, nb, 128)[1, 1], p.sc[1, 1], p.mn[1, 1]
    assert b[0:2].view(np.float16)[0] == p.d[1, 1] and b[2:4].view(np.float16)[0] == p.dmin[1, 1]
    for j in range(4):
        assert b[4 + j] & 63 == sc[j]
        assert ((b[8 + j // 2] >> (4 * (j % 2))) & 15) | ((b[4 + j] >> 6) << 4) == mn[j]
    for i in range(128):
        assert (b[10 + i % 16] >> (i // 16)) & 1 == q[i] >> 4
        assert (b[26 + 32 * (i // 64) + i % 32] >> (4 * ((i // 32) % 2))) & 15 == q[i] & 15
    y = codec.dequantize(data, T, nb * 128).reshape(rows, nb, 4, 32)
    dl = p.d.astype(np.float32)[..., None] * p.sc.astype(np.float32)
    ml = p.dmin.astype(np.float32)[..., None] * p.mn.astype(np.float32)
    want = dl[..., None] * p.q.reshape(rows, nb, 4, 32).astype(np.float32) - ml[..., None]
    np.testing.assert_array_equal(y.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_pack_unpack_round_trip_and_range() -> None:
    x = _heavy(5, 640, 5)
    data = codec.quantize(x, T, imatrix=np.ones(640, np.float32))
    p = codec.unpack(data, T, 640)
    assert p.q.max() <= 31 and p.sc.max() <= 63 and p.mn.max() <= 63 and p.sc.shape == (5, 5, 4)
    np.testing.assert_array_equal(codec.pack(T, p), data)
    bad = codec.BlockParams(q=np.full((1, 128), 32, np.uint8), d=np.ones((1, 1), np.float16),
                       dmin=np.ones((1, 1), np.float16), sc=np.zeros((1, 1, 4), np.uint8),
                       mn=np.zeros((1, 1, 4), np.uint8))
    with pytest.raises(ValueError):
        codec.pack(T, bad)


def test_rejects_rows_not_multiple_of_128() -> None:
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        codec.quantize(np.zeros((1, 192), np.float32), T)


def test_adversarial_rows_follow_q5k() -> None:
    """Zeros, constants, huge outliers, denormals, ...: still exactly Q5_K's decoding of the doubled row."""
    x = np.ascontiguousarray(adversarial_rows(384, np.random.default_rng(8)), dtype=np.float32)
    ours = codec.dequantize(codec.quantize(x, T), T, 384)
    q5k = codec.dequantize(codec.quantize(_doubled(x), "Q5_K"), "Q5_K", 768)
    ref = q5k.reshape(len(x), 3, 2, 128)[:, :, 0, :].reshape(len(x), 384)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_beats_q5_0_at_plus_an_eighth_bit() -> None:
    """What the type is for (docs/BENCHMARKS.md): on 128*odd rows it replaces Q5_0 (5.5 bpw) at 5.625 bpw."""
    x = _heavy(64, 896, 6)
    im = np.random.default_rng(7).uniform(0.1, 4.0, 896).astype(np.float32)

    def err(t: str) -> float:
        w = codec.dequantize(codec.quantize(x, t, imatrix=im), t, 896)
        return float((((x - w) ** 2) * im).sum() / ((x * x) * im).sum())

    assert err("QR5_K128") < 0.85 * err("Q5_0")
