"""The GGUF tensor types qrealign-gguf writes: ids, block geometry, names.

Facts only (ids and sizes are ggml's); this module knows nothing about models.

Custom types: qrealign-gguf also defines its own tensor types, flagged `custom`, with ids in the range
qrealign reserves, 240..249 (upstream ggml's ids end at 42 in the pinned tree; forks have used 142-143).
gguf-py's GGMLQuantizationType does not know them, so `ggml` is then a plain int and files holding them
are read through qrealign_gguf.gguf_read. Only llama.cpp with native/llama_patches applied runs them.
Their C definition is native/qr_custom.h.

  QR4_KO (240)  "Q4_K + outliers": per 256 weights a standard Q4_K block (144 bytes) followed by uint8 idx[4]
                (outlier positions, strictly increasing) and fp16 val[4]; dequantized as Q4_K, then
                y[idx[j]] = val[j]. 156 bytes per 256 weights = 4.875 bits per weight.
  QR5_K128 (241) Q5_K's math on 128-weight super-blocks (4 sub-blocks of 32, 6-bit scale and min codes), for
                rows a multiple of 128 but not of 256 (hidden 640, 896, ...) where llama.cpp falls back to
                Q5_0 / Q5_1. 90 bytes per 128 weights = 5.625 bits per weight. Layout: native/qr_custom.h.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T


@dataclass(frozen=True)
class QType:
    name: str
    ggml: T | int  # gguf-py's enum member; a plain int for custom types (gguf-py does not know them)
    block_size: int  # weights per block
    type_size: int  # bytes per block
    has_min: bool = False  # affine (d, m) rather than symmetric (d)
    nsub: int = 0  # sub-blocks per block carrying their own scale codes (K-quants)
    native: bool = True  # encoded by our C codec (F32/F16/BF16 are plain casts)
    custom: bool = False  # qrealign's own type (id 240..249): stock llama.cpp cannot load it
    n_outliers: int = 0  # per block: fp16 values replacing the block format's value at their positions
    base: str | None = None  # custom types: the ggml type their block embeds (QR4_KO: Q4_K)

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
    QType("QR4_KO", 240, 256, 156, has_min=True, nsub=8, custom=True, n_outliers=4, base="Q4_K"),
    QType("QR5_K128", 241, 128, 90, has_min=True, nsub=4, custom=True),
)}
CUSTOM_IDS = range(240, 250)  # reserved by qrealign-gguf


class CustomGGMLType(int):
    """Stand-in for a GGMLQuantizationType member where gguf-py has none (custom types): .name and .value."""

    @property
    def name(self) -> str:
        return by_id(int(self)).name

    @property
    def value(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"<CustomGGMLType.{self.name}: {int(self)}>"


def custom_types() -> list[QType]:
    return [q for q in QTYPES.values() if q.custom]


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


def ggml_type_of(type_id: int) -> T | CustomGGMLType:
    """gguf-py's enum member for an upstream id, our stand-in for a custom one; ValueError for others."""
    try:
        return T(type_id)
    except ValueError:
        if any(q.custom and q.id == type_id for q in QTYPES.values()):
            return CustomGGMLType(type_id)
        raise
