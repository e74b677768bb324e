"""Hand-built GGUF bytes for the hostile-input tests: every length and count is whatever the test says, so a file
can claim things no writer would produce (an array of 2**60 items, a tensor past the end, a misaligned offset).

Layout (little-endian): b"GGUF", u32 version, u64 n_tensors, u64 n_kv, the key/values, the tensor records,
zero padding to the alignment, then tensor data.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
T_F32, T_F16, T_Q8_0 = 0, 1, 8  # ggml tensor type ids


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, v: int) -> bytes:
    return kv(key, U32, struct.pack("<I", v))


def kv_str(key: str, v: str | bytes) -> bytes:
    return kv(key, STR, gstr(v))


def kv_arr(key: str, sub: int, count: int, items: bytes = b"") -> bytes:
    """An array record claiming `count` items of type `sub`, followed by `items` (however many that really is)."""
    return kv(key, ARR, struct.pack("<IQ", sub, count) + items)


def tinfo(name: str | bytes, dims: list[int], ttype: int, offset: int) -> bytes:
    return (gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ttype, offset))


def gguf(kvs: Sequence[bytes], infos: Sequence[bytes] = (), data: bytes = b"", *, version: int = 3, align: int = 32,
         n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    head = (b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                  len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    if infos:
        head += b"\0" * (-len(head) % align)
    return head + data


def small_valid() -> bytes:
    """A complete, valid GGUF: two F32 tensors of 8 values (32 bytes each, so the second starts at offset 32)."""
    data = struct.pack("<8f", *range(8)) + struct.pack("<8f", *range(8, 16))
    return gguf([kv_str("general.architecture", "llama"), kv_str("general.name", "tiny"),
                 kv_arr("tokenizer.ggml.tokens", STR, 2, gstr("a") + gstr("b"))],
                [tinfo("a.weight", [8], T_F32, 0), tinfo("b.weight", [4, 2], T_F32, 32)], data)
