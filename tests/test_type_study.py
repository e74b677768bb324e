"""The math behind the type-design measurements (docs/BENCHMARKS.md, round 8): the grid dither that moves a
GGUF-born model off its quantization grid, and the study's emulation of "K-quant + outliers" blocks, which must be
exactly what the real QR4_KO codec does when the base is Q4_K."""
from __future__ import annotations


import numpy as np
import torch

from qrealign_gguf.formats import codec

from tools.studies.dither_model import dither, grid_step
from tools.studies.outlier_study import small_superblock, with_outliers


def _grid_rows(rng: np.random.Generator, rows: int, cols: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows on a per-group grid: integer codes (two adjacent ones in every group) times that group's step."""
    steps = rng.uniform(0.001, 0.01, size=(rows * cols // group, 1)).astype(np.float32)
    codes = rng.integers(-8, 8, size=(rows * cols // group, group))
    codes[:, 1] = codes[:, 0] + 1
    return (codes * steps).reshape(rows, cols).astype(np.float32), steps[:, 0]


def test_grid_step_reads_the_cell_off_the_weights() -> None:
    x, steps = _grid_rows(np.random.default_rng(0), 6, 64, 16)
    np.testing.assert_allclose(grid_step(torch.from_numpy(x), 16).numpy(), steps, rtol=1e-4)
    assert grid_step(torch.ones(1, 16), 16).item() == 0.0  # one distinct value: no cell, no dither


def test_dither_stays_inside_half_a_cell_and_leaves_the_grid() -> None:
    x, steps = _grid_rows(np.random.default_rng(1), 4, 64, 16)
    t = torch.from_numpy(x)
    d1 = dither(t, 16, torch.Generator().manual_seed(0))
    d2 = dither(t, 16, torch.Generator().manual_seed(0))
    assert torch.equal(d1, d2)  # deterministic for a seed
    noise = (d1 - t).numpy().reshape(-1, 16)
    assert (np.abs(noise) <= steps[:, None] / 2 + 1e-7).all()
    assert (np.abs(noise) > 1e-3 * steps[:, None]).mean() > 0.99  # off the grid, not snapped back
    assert dither(torch.ones(3, 10), 16, torch.Generator()).shape == (3, 10)  # rows not a group multiple: copied


def test_outlier_emulation_is_the_qr4ko_codec() -> None:
    rng = np.random.default_rng(2)
    w = (rng.standard_t(3, size=(6, 512)) * 0.02).astype(np.float32)
    for im in (np.ones(512, np.float32), rng.uniform(0.1, 10.0, 512).astype(np.float32)):
        real = codec.dequantize(codec.quantize(w, "QR4_KO", im), "QR4_KO", 512)
        np.testing.assert_array_equal(with_outliers(w, im, "Q4_K"), real)


def test_small_superblock_emulation_uses_only_its_own_128_weights() -> None:
    """A 128 super-block must not see its neighbour: changing the second half of each 256 leaves the first alone."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((4, 512)) * 0.02).astype(np.float32)
    im = np.ones(512, np.float32)
    w2 = w.copy()
    w2[:, 128:256] *= 50.0
    a, b = small_superblock(w, im, "Q5_K"), small_superblock(w2, im, "Q5_K")
    np.testing.assert_array_equal(a[:, :128], b[:, :128])
    err = ((a - w) ** 2).sum() / (w * w).sum()
    assert err < 2e-3  # a 5-bit K-quant of Gaussian rows
