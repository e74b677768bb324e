"""Shared fixtures: the pinned llama.cpp build (the oracle) and libggml's own quantizer via cffi."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qrealign_gguf.llamacpp import LlamaBuild, find_llama
from tools.bench.ggml_oracle import GGML

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def llama() -> LlamaBuild:
    return find_llama()


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
