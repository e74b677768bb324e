"""The one reader for untrusted GGUF files: a bounded structural walk over an mmap, before anything else touches them.

Every length the file claims (string lengths, array counts, tensor dimensions, offsets) is checked against the bytes
that are really left BEFORE anything is allocated or looped over, so a 100-byte file that claims an array of 2**60
items costs nothing. The rules are llama.cpp's (ggml/src/gguf.cpp, gguf_init_from_file): a file this module accepts
is one ggml's loader accepts, and the other way round for everything we check:

  magic "GGUF", version 2 or 3 (a byte-swapped version means a big-endian file); keys non-empty UTF-8 and unique;
  value types 0..12, arrays of scalars or strings only (ggml has no nested arrays), at most 2**30 items; strings
  at most 2**30 bytes; general.alignment a uint32 power of two; tensor names UTF-8, unique, shorter than 64 bytes;
  at most 4 dimensions, none negative, their product representable in int64; a known tensor type with the row
  length a multiple of its block; offsets exactly where ggml expects them (each tensor right after the previous
  one, padded to the alignment: nothing misaligned, overlapping or out of order); all tensor data inside the file.

gguf-py's reader trusts these lengths (and decodes every vocabulary string into Python objects: seconds for a
150k-token vocabulary); this walk only decodes what it is asked for (scalars, the first items of arrays).
A split model's shard (split.count > 1) is checked on its own: its own tensors, offsets from its own data section.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .formats.types import custom_types

# GGUF value types (gguf-py's GGUFValueType) -> struct format of the scalar
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
              8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}

# ggml's limits (ggml/src/gguf.cpp, ggml/include/ggml.h)
MAX_ARRAY_ITEMS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS
MAX_STRING_BYTES = 1 << 30  # GGUF_MAX_STRING_LENGTH
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 64  # GGML_MAX_NAME, including the terminating NUL
DEFAULT_ALIGNMENT = 32
INT64_MAX = (1 << 63) - 1
# smallest possible records: key (8-byte length + 1 byte) + type + 1-byte value; name + n_dims + type + offset
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 8 + 1 + 4 + 1, 8 + 1 + 4 + 4 + 8


class GGUFFormatError(ValueError):
    """A malformed GGUF file, or one that claims more than it holds; the message is a short reason."""


@dataclass(frozen=True)
class MetaValue:
    """One key's value. Scalars and strings: `value` (strings decoded, bad UTF-8 replaced). Arrays: `count` items
    of `item_type`, `value` a tuple of the first few (strings decoded the same way)."""
    type: int
    value: Any
    count: int = 1
    item_type: int | None = None

    def display(self) -> str:
        """How `inspect` shows it: the value, or "[N x TYPE] first, items, ..." for an array."""
        if self.type != ARRAY:
            return str(self.value)
        items = ", ".join(str(v) for v in self.value)
        more = ", ..." if self.count > len(self.value) else ""
        return f"[{self.count} x {TYPE_NAMES[self.item_type or 0]}] {items}{more}"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the row length (ggml's ne[0]); numpy's shape is reversed
    type_id: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


@dataclass
class GGUFLayout:
    """A GGUF file's checked structure: every key, every tensor record, where the data section starts."""
    path: Path
    size: int
    version: int
    alignment: int
    data_offset: int  # absolute position of the data section
    kv: dict[str, MetaValue] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    def scalar(self, key: str) -> Any:
        """A scalar or string key's value; None when the key is missing or holds an array."""
        v = self.kv.get(key)
        return None if v is None or v.type == ARRAY else v.value

    def array_len(self, key: str) -> int | None:
        """An array key's item count (tokenizer.ggml.tokens: the vocabulary size); None when missing or no array."""
        v = self.kv.get(key)
        return v.count if v is not None and v.type == ARRAY else None

    @property
    def array_items(self) -> int:
        """Items in all metadata arrays together (what gguf-py's reader makes one numpy view each of)."""
        return sum(v.count for v in self.kv.values() if v.type == ARRAY)


def block_geometry(type_id: int) -> tuple[int, int] | None:
    """(weights, bytes) per block of a tensor type: gguf-py's table plus qrealign's custom types; None if unknown."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        q = next((q for q in custom_types() if q.id == type_id), None)
        return None if q is None else (q.block_size, q.type_size)


class _Cursor:
    """Reads little-endian values from an mmap; every read is checked against the end of the file first."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise GGUFFormatError(f"{what} needs {n} bytes at offset {self.pos}, only {self.left} left "
                                  "(truncated or corrupt file)")

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def string(self, what: str, keep: bool = True) -> bytes | None:
        (n,) = self.unpack("<Q", what)
        if n > MAX_STRING_BYTES:
            raise GGUFFormatError(f"{what} claims {n} bytes (llama.cpp's limit is {MAX_STRING_BYTES})")
        self.need(n, what)
        s = self.buf[self.pos:self.pos + n] if keep else None
        self.pos += n
        return s


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GGUFFormatError(f"{what} is not valid UTF-8: {raw[:40]!r}") from None


def _read_value(c: _Cursor, vtype: int, key: str, preview: int) -> MetaValue:
    what = f"value of {key}"
    if vtype in SCALAR_FORMATS:
        (v,) = c.unpack("<" + SCALAR_FORMATS[vtype], what)
        return MetaValue(vtype, v)
    if vtype == STRING:
        return MetaValue(vtype, c.string(what).decode("utf-8", "replace"))  # type: ignore[union-attr]
    if vtype != ARRAY:
        raise GGUFFormatError(f"key {key} has unknown value type {vtype}")
    sub, n = c.unpack("<IQ", f"array header of {key}")
    if sub == ARRAY:
        raise GGUFFormatError(f"key {key} is an array of arrays, which llama.cpp cannot read")
    if n > MAX_ARRAY_ITEMS:
        raise GGUFFormatError(f"key {key} claims {n} array items (llama.cpp's limit is {MAX_ARRAY_ITEMS})")
    if sub in SCALAR_FORMATS:
        width = struct.calcsize("<" + SCALAR_FORMATS[sub])
        c.need(n * width, f"array {key} ({n} x {TYPE_NAMES[sub]})")
        items = struct.unpack_from(f"<{min(n, preview)}{SCALAR_FORMATS[sub]}", c.buf, c.pos)
        c.pos += n * width
        return MetaValue(ARRAY, items, n, sub)
    if sub != STRING:
        raise GGUFFormatError(f"key {key} is an array of unknown value type {sub}")
    c.need(n * 8, f"array {key} ({n} strings)")  # each string is at least its 8-byte length
    items = []
    for i in range(n):  # bounded: n * 8 bytes are known to be there, and each string consumes at least 8
        s = c.string(f"string {i} of array {key}", keep=i < preview)
        if s is not None:
            items.append(s.decode("utf-8", "replace"))
    return MetaValue(ARRAY, tuple(items), n, sub)


def _read_tensor(c: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
    raw = c.string(f"name of tensor {i}")
    assert raw is not None
    name = _utf8(raw, f"name of tensor {i}")
    if len(raw) >= MAX_TENSOR_NAME:
        raise GGUFFormatError(f"tensor name {name[:40]!r}... is {len(raw)} bytes (llama.cpp's limit is "
                              f"{MAX_TENSOR_NAME - 1})")
    (nd,) = c.unpack("<I", f"dimension count of tensor {name}")
    if nd > MAX_DIMS:
        raise GGUFFormatError(f"tensor {name} has {nd} dimensions (ggml allows at most {MAX_DIMS})")
    dims = c.unpack(f"<{nd}Q", f"dimensions of tensor {name}")
    type_id, offset = c.unpack("<IQ", f"type and offset of tensor {name}")
    return name, dims, type_id, offset


def _tensor_bytes(name: str, dims: tuple[int, ...], type_id: int) -> int:
    n = 1
    for d in dims:
        if d > INT64_MAX:  # ggml reads dimensions as int64: this is a negative one
            raise GGUFFormatError(f"tensor {name} has a negative dimension ({d - (1 << 64)})")
        n *= d
        if n > INT64_MAX:
            raise GGUFFormatError(f"tensor {name}'s shape {list(dims)} has more than 2**63 elements")
    geom = block_geometry(type_id)
    if geom is None:
        raise GGUFFormatError(f"tensor {name} has unknown tensor type {type_id}")
    block, type_size = geom
    row = dims[0] if dims else 1
    if row % block:
        raise GGUFFormatError(f"tensor {name}: row length {row} is not a multiple of its type's block of {block}")
    return n // block * type_size


def read_gguf(path: str | Path, preview: int = 8) -> GGUFLayout:
    """Walk and check the whole file (header, every key/value, every tensor record, the data layout) without
    reading tensor data. `preview`: how many items of each array to decode. Raises GGUFFormatError."""
    p = Path(path)
    size = p.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"only {size} bytes; a GGUF header alone is 24")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        c = _Cursor(m, size)
        (magic,) = c.unpack("<4s", "magic")
        if magic != b"GGUF":
            raise GGUFFormatError(f"starts with {magic!r}, not b'GGUF': not a GGUF file")
        version, n_tensors, n_kv = c.unpack("<IQQ", "header")
        if version & 0xFFFF == 0:
            raise GGUFFormatError("big-endian GGUF (byte-swapped version); llama.cpp here reads little-endian files")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)")
        if n_kv > c.left // _MIN_KV_BYTES or n_tensors > c.left // _MIN_TENSOR_BYTES:
            raise GGUFFormatError(f"claims {n_kv} keys and {n_tensors} tensors, more than its {size} bytes can hold")
        layout = GGUFLayout(p, size, version, DEFAULT_ALIGNMENT, 0)
        for i in range(n_kv):
            raw = c.string(f"key {i}")
            assert raw is not None
            if not raw:
                raise GGUFFormatError(f"key {i} is empty")
            key = _utf8(raw, f"key {i}")
            if key in layout.kv:
                raise GGUFFormatError(f"duplicate key {key}")
            (vtype,) = c.unpack("<I", f"type of key {key}")
            layout.kv[key] = _read_value(c, vtype, key, preview)
        align = layout.kv.get("general.alignment")
        if align is not None:
            if align.type != 4:
                raise GGUFFormatError(f"general.alignment is a {TYPE_NAMES.get(align.type)}, must be a UINT32")
            if align.value == 0 or align.value & (align.value - 1):
                raise GGUFFormatError(f"general.alignment {align.value} is not a power of two")
            layout.alignment = align.value
        _check_tensors(c, layout, n_tensors)
    return layout


def _check_tensors(c: _Cursor, layout: GGUFLayout, n_tensors: int) -> None:
    """Read the tensor records, then check the data layout the way ggml does: each tensor exactly at the end of
    the previous one, padded to the alignment, and all of it inside the file."""
    records = []
    names: set[str] = set()
    for i in range(n_tensors):
        name, dims, type_id, offset = _read_tensor(c, i)
        if name in names:
            raise GGUFFormatError(f"duplicate tensor name {name}")
        names.add(name)
        records.append((name, dims, type_id, offset, _tensor_bytes(name, dims, type_id)))
    align = layout.alignment
    layout.data_offset = c.pos + (-c.pos % align)
    expected = 0
    for name, dims, type_id, offset, nbytes in records:
        if offset != expected:
            why = ("is not a multiple of the alignment " + str(align) if offset % align
                   else "overlaps the previous tensor" if offset < expected else "leaves a gap after the previous one")
            raise GGUFFormatError(f"tensor {name}'s data offset {offset} {why} (expected {expected})")
        end = layout.data_offset + offset + nbytes
        if end > layout.size:
            raise GGUFFormatError(f"tensor {name}'s data ends at byte {end}, the file has {layout.size} "
                                  "(truncated or corrupt file)")
        layout.tensors.append(TensorInfo(name, dims, type_id, offset, nbytes))
        expected = offset + nbytes + (-nbytes % align)

