"""The GGUF tensor types qrealign-gguf writes: ids, block geometry, names.

Facts only (ids and sizes are ggml's); this module knows nothing about models.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T


@dataclass(frozen=True)
class QType:
    name: str
    ggml: T
    block_size: int  # weights per block
    type_size: int  # bytes per block
    has_min: bool = False  # affine (d, m) rather than symmetric (d)
    nsub: int = 0  # sub-blocks per block carrying their own scale codes (K-quants)
    native: bool = True  # encoded by our C codec (F32/F16/BF16 are plain casts)

    @property
    def id(self) -> int:
        return int(self.ggml)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, ncols: int) -> int:
        return ncols // self.block_size * self.type_size


def _q(name: str, **kw: object) -> QType:
    g = T[name]
    bs, ts = GGML_QUANT_SIZES[g]
    return QType(name, g, bs, ts, **kw)  # type: ignore[arg-type]


QTYPES: dict[str, QType] = {q.name: q for q in (
    _q("F32", native=False),
    _q("F16", native=False),
    _q("BF16", native=False),
    _q("Q8_0"),
    _q("Q4_0"),
    _q("Q4_1", has_min=True),
    _q("Q5_0"),
    _q("Q5_1", has_min=True),
    _q("IQ4_NL"),  # only as llama.cpp's fallback for Q2_K/Q3_K on rows not a multiple of 256
    _q("Q2_K", has_min=True, nsub=16),
    _q("Q3_K", nsub=16),
    _q("Q4_K", has_min=True, nsub=8),
    _q("Q5_K", has_min=True, nsub=8),
    _q("Q6_K", nsub=16),
)}


def qtype(name: str) -> QType:
    """Look a type up by name (case-insensitive); ValueError lists the valid names."""
    q = QTYPES.get(name.upper())
    if q is None:
        raise ValueError(f"unknown tensor type {name!r}; choose one of {', '.join(QTYPES)}")
    return q


def by_id(type_id: int) -> QType:
    for q in QTYPES.values():
        if q.id == type_id:
            return q
    raise ValueError(f"tensor type id {type_id} is not one qrealign-gguf writes")
