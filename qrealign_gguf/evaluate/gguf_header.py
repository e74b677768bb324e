"""Fast structural check of a GGUF file: header, every key/value, every tensor record, data region in bounds.

gguf-py's GGUFReader decodes every vocabulary string into Python objects (seconds for a 150k-token vocab); eval
only needs "is this a complete GGUF llama.cpp can map, and does it carry a chat template", before long work.
Split files (*-00001-of-0000N.gguf) are checked for their own tensors only.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


def _block_size(ttype: int) -> tuple[int, int]:
    """(weights, bytes) per block: gguf-py's table, plus qrealign's custom types (QR4_KO) it does not know."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    except ValueError:
        from ..formats.types import by_id

        q = by_id(ttype)  # ValueError for an id neither gguf-py nor qrealign knows
        return q.block_size, q.type_size


def read_gguf_header(path: str | Path, want: tuple[str, ...] = ("tokenizer.chat_template", "general.architecture",
                                                                 "general.alignment", "tokenizer.ggml.tokens")) -> dict:
    """Walk the whole header; returns {"version", "n_tensors", "kv": {key: value for keys in want}} (strings and
    scalars as values, arrays as their length, e.g. tokenizer.ggml.tokens -> vocabulary size).

    Raises GGUFFormatError with a short reason for anything a loader would choke on (bad magic/version, a record
    running past the end of the file, unknown value or tensor types, tensor data beyond the end: truncated file).
    """
    p = Path(path)
    size = p.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"only {size} bytes")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise GGUFFormatError("bad magic, not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version}")
        if n_tensors > size or n_kv > size:
            raise GGUFFormatError("implausible tensor / key counts")
        pos = 24

        def need(n: int) -> None:
            if pos + n > size:
                raise GGUFFormatError("header runs past the end of the file (truncated?)")

        def read_str() -> bytes:
            nonlocal pos
            need(8)
            (n,) = struct.unpack_from("<Q", m, pos)
            need(8 + n)
            s = m[pos + 8:pos + 8 + n]
            pos += 8 + n
            return s

        def read_value(t: int, keep: bool):  # noqa: ANN202
            nonlocal pos
            if t in _SCALAR:
                fmt = "<" + _SCALAR[t]
                need(struct.calcsize(fmt))
                (v,) = struct.unpack_from(fmt, m, pos)
                pos += struct.calcsize(fmt)
                return v
            if t == _STRING:
                s = read_str()
                return s.decode("utf-8", "replace") if keep else None
            if t == _ARRAY:
                need(12)
                sub, n = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if sub in _SCALAR:
                    w = struct.calcsize("<" + _SCALAR[sub])
                    need(w * n)
                    pos += w * n
                elif sub == _STRING:
                    for _ in range(n):
                        need(8)
                        (k,) = struct.unpack_from("<Q", m, pos)
                        need(8 + k)
                        pos += 8 + k
                elif sub == _ARRAY:
                    for _ in range(n):
                        read_value(_ARRAY, False)
                else:
                    raise GGUFFormatError(f"unknown array element type {sub}")
                return n if keep else None  # arrays: their length
            raise GGUFFormatError(f"unknown value type {t}")

        kv: dict = {}
        for _ in range(n_kv):
            key = read_str().decode("utf-8", "replace")
            need(4)
            (t,) = struct.unpack_from("<I", m, pos)
            pos += 4
            v = read_value(t, key in want)
            if key in want:
                kv[key] = v
        tensors = []
        for _ in range(n_tensors):
            name = read_str()
            need(4)
            (nd,) = struct.unpack_from("<I", m, pos)
            if nd > 8:
                raise GGUFFormatError(f"tensor {name[:60]!r} has {nd} dimensions")
            need(4 + 8 * nd + 12)
            dims = struct.unpack_from(f"<{nd}Q", m, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            try:
                block, tsize = _block_size(ttype)
            except (ValueError, KeyError):
                raise GGUFFormatError(f"tensor {name.decode('utf-8', 'replace')} has unknown type {ttype}") from None
            n = 1
            for d in dims:
                n *= d
            tensors.append((offset, n // block * tsize))
        align = int(kv.get("general.alignment") or 32)
        data = (pos + align - 1) // align * align
        end = max((data + o + nb for o, nb in tensors), default=pos)
        if end > size:
            raise GGUFFormatError(f"tensor data needs {end} bytes, file has {size} (truncated?)")
    return {"version": version, "n_tensors": n_tensors, "kv": kv}
