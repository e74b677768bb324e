"""qrealign's custom type QR4_KO (Q4_K + 4 fp16 outliers per 256 weights) in the C codec.

The oracle for the Q4_K part is our own Q4_K codec (byte-identical with ggml's, tests/test_codec_k.py):
a QR4_KO block must be exactly the Q4_K importance encoding of the block with the outliers taken out
(importance 0, input replaced by their sub-block's mean), followed by the outliers.
"""
from __future__ import annotations

import numpy as np
import pytest

from qrealign_gguf.formats import codec
from qrealign_gguf.formats.types import qtype

from conftest import adversarial_rows

T = qtype("QR4_KO")
NOUT, QK = 4, 256


def _select(x: np.ndarray, im: np.ndarray | None) -> np.ndarray:
    """Reference outlier choice for one block: the 4 largest x^2*im, ties to the lower index, sorted."""
    imp = (x * x).astype(np.float32)
    if im is not None:
        imp = (imp * im).astype(np.float32)
    order = sorted(range(QK), key=lambda i: (-float(imp[i]), i))
    return np.array(sorted(order[:NOUT]), dtype=np.uint8)


def _reference_block(x: np.ndarray, im: np.ndarray | None) -> bytes:
    """The documented recipe, built from the Q4_K codec: outliers out, Q4_K imatrix search on the rest."""
    idx = _select(x, im)
    qw = np.ones(QK, np.float32) if im is None else im.astype(np.float32).copy()
    qw[idx] = 0
    xr = x.astype(np.float32).copy()
    out = np.zeros(QK, bool)
    out[idx] = True
    for s in range(8):
        sl = slice(32 * s, 32 * s + 32)
        acc = np.float32(0)
        for v in x[sl][~out[sl]]:  # float32 sum in index order, as the C code
            acc = np.float32(acc + np.float32(v))
        xr[sl][out[sl]] = np.float32(acc / np.float32((~out[sl]).sum()))
    q4k = codec.quantize(xr[None], "Q4_K", imatrix=qw)[0]
    return q4k.tobytes() + idx.tobytes() + x[idx].astype(np.float16).tobytes()


def _heavy(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(2.5, (rows, cols)) * 0.02).astype(np.float32)


def test_type_table() -> None:
    assert (T.id, T.block_size, T.type_size, T.custom, T.n_outliers) == (240, 256, 156, True, 4)
    assert T.bits_per_weight == 4.875
    assert codec._lib.qr_type_size(240) == 156 and codec._lib.qr_block_size(240) == 256
    assert codec._lib.qr_type_outliers(240) == 4 and codec._lib.qr_type_outliers(12) == 0
    assert codec._lib.qr_row_size(240, 1024) == 4 * 156


@pytest.mark.parametrize("use_im", [False, True])
def test_blocks_follow_the_recipe(use_im: bool) -> None:
    """Every block = Q4_K(imatrix search, outliers at importance 0) + idx + fp16(x[idx]), byte for byte."""
    x = _heavy(6, 1024, 1)
    x[1] = adversarial_rows(1024, np.random.default_rng(2))[6] * 0.01  # huge outliers
    im = np.random.default_rng(3).uniform(0.1, 4.0, 1024).astype(np.float32) if use_im else None
    got = codec.quantize(x, T, imatrix=im)
    assert got.shape == (6, 4 * 156)
    for r in range(6):
        for b in range(4):
            cols = slice(QK * b, QK * (b + 1))
            want = _reference_block(x[r, cols], None if im is None else im[cols])
            assert got[r, 156 * b:156 * (b + 1)].tobytes() == want, (r, b)


def test_layout_and_decode() -> None:
    """Bytes 0..143 are a Q4_K block the standard Q4_K decoder reads; the outliers replace their positions."""
    x = _heavy(5, 768, 4)
    data = codec.quantize(x, T)
    y = codec.dequantize(data, T, 768)
    blocks = data.reshape(-1, 156)
    q4k = codec.dequantize(np.ascontiguousarray(blocks[:, :144]), "Q4_K", QK).reshape(5, 768)
    idx = blocks[:, 144:148].reshape(5, 3, 4).astype(np.int64)
    val = np.ascontiguousarray(blocks[:, 148:156]).view("<f2").reshape(5, 3, 4)
    mask = np.zeros((5, 3, QK), bool)
    np.put_along_axis(mask, idx, True, axis=2)
    mask = mask.reshape(5, 768)
    assert mask.sum() == 5 * 3 * 4 and np.all(np.diff(idx, axis=2) > 0)
    np.testing.assert_array_equal(y[~mask], q4k[~mask])
    np.testing.assert_array_equal(y.reshape(5, 3, QK)[np.arange(5)[:, None, None], np.arange(3)[None, :, None], idx],
                                  val.astype(np.float32))
    # outliers are exact (to fp16) and are the largest-magnitude weights of their block
    np.testing.assert_array_equal(y[mask], x[mask].astype(np.float16).astype(np.float32))
    xb = np.abs(x.reshape(5, 3, QK))
    assert np.all(np.sort(xb, axis=2)[..., -4:].min(axis=2) <= np.where(mask.reshape(5, 3, QK), xb, np.inf).min(axis=2))


def test_pack_unpack_round_trip() -> None:
    x = _heavy(4, 512, 5)
    data = codec.quantize(x, T, imatrix=np.linspace(0.5, 2, 512, dtype=np.float32))
    p = codec.unpack(data, T, 512)
    assert p.oidx.shape == (4, 2, 4) and p.oval.dtype == np.float16 and p.sc.shape == (4, 2, 8)
    np.testing.assert_array_equal(codec.pack(T, p), data)
    # caller-chosen outliers: any increasing positions, any fp16 values
    p.oidx[:] = np.array([0, 17, 200, 255], np.uint8)
    p.oval[:] = np.array([1.5, -2.25, 65504, -0.0], np.float16)
    y = codec.dequantize(codec.pack(T, p), T, 512).reshape(4, 2, QK)
    np.testing.assert_array_equal(y[:, :, [0, 17, 200, 255]], np.broadcast_to(np.float32([1.5, -2.25, 65504, -0.0]), (4, 2, 4)))
    assert np.signbit(y[:, :, 255]).all()


def test_pack_rejects_bad_outliers() -> None:
    p = codec.unpack(codec.quantize(_heavy(1, 256, 6), T), T, 256)
    for bad in ([3, 3, 4, 5], [9, 4, 5, 6]):
        q = codec.BlockParams(p.q, p.d, p.dmin, p.sc, p.mn, np.array(bad, np.uint8).reshape(1, 1, 4), p.oval)
        with pytest.raises(ValueError, match="bad argument"):
            codec.pack(T, q)
    with pytest.raises(ValueError, match="outliers"):
        codec.pack(T, codec.BlockParams(p.q, p.d, p.dmin, p.sc, p.mn))
    q = codec.BlockParams(p.q.copy(), p.d, p.dmin, p.sc, p.mn, p.oidx, p.oval)
    q.q[0, 0] = 16
    with pytest.raises(ValueError, match="bad argument"):
        codec.pack(T, q)
    with pytest.raises(ValueError, match="bad argument"):  # the plain entry points refuse an outlier type
        codec._check(codec._lib.qr_unpack(240, codec._ffi.NULL, codec._ffi.NULL, codec._ffi.NULL, codec._ffi.NULL,
                                          codec._ffi.NULL, codec._ffi.NULL, 1, 256), "unpack")


def test_ties_and_degenerate_rows() -> None:
    x = adversarial_rows(512, np.random.default_rng(8))
    data = codec.quantize(x, T)
    p = codec.unpack(data, T, 512)
    np.testing.assert_array_equal(p.oidx[1], [[0, 1, 2, 3]] * 2)  # all zero: ties go to the lowest index
    np.testing.assert_array_equal(p.oidx[2], [[0, 1, 2, 3]] * 2)  # constant
    y = codec.dequantize(data, T, 512)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[1], 0)
    assert np.abs(y[2] - 0.37).max() < 1e-3


def test_deterministic_across_threads() -> None:
    x = _heavy(33, 1024, 9)
    im = np.random.default_rng(1).uniform(0, 3, 1024).astype(np.float32)
    a = codec.quantize(x, T, imatrix=im, threads=1)
    b = codec.quantize(x, T, imatrix=im, threads=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(codec.dequantize(a, T, 1024, threads=1), codec.dequantize(a, T, 1024, threads=3))


@pytest.mark.parametrize("use_im", [False, True])
def test_lower_error_than_q4k_on_heavy_tails(use_im: bool) -> None:
    x = _heavy(64, 2048, 10)
    im = np.random.default_rng(11).uniform(0.2, 5, 2048).astype(np.float32) if use_im else None
    w = np.ones(2048, np.float32) if im is None else im

    def err(t: str) -> float:
        y = codec.dequantize(codec.quantize(x, t, imatrix=im), t, 2048)
        return float((w * (y - x) ** 2).sum())

    e_ko, e_k4 = err("QR4_KO"), err("Q4_K")
    assert e_ko < 0.8 * e_k4, (e_ko, e_k4)
