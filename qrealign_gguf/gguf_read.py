"""gguf-py's GGUFReader, behind qrealign's bounded check and taught qrealign's custom tensor types.

gguf-py's reader trusts every length a file claims (an array count of 2**60 in a 113-byte file loops without
end), so `GGUFReader` first walks the file with gguf_file.read_gguf, which raises GGUFFormatError for anything
llama.cpp would reject, and only then lets gguf-py map the (now known-good) file. It reads the upstream tensors
exactly as gguf-py does and the custom ones (formats/types.py: QR4_KO = 240, ...) as raw uint8 blocks
(rows x row bytes) with `tensor_type` a CustomGGMLType (.name "QR4_KO", .value 240).

gguf-py makes one numpy view per metadata array item (about 1 KB and 30 us each): `max_array_items` lets a caller
that expects no large arrays (an imatrix) refuse a file that would cost gigabytes before gguf-py starts.
Metadata and the tensor table alone (inspect, package, eval) need no gguf-py at all: use gguf_file.read_gguf.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_reader import ReaderField, ReaderTensor

from .formats.types import CustomGGMLType, by_id, custom_types
from .gguf_file import GGUFFormatError, GGUFLayout, read_gguf


class GGUFReader(gguf.GGUFReader):
    """gguf-py's reader for a file read_gguf has accepted; GGUFFormatError (a ValueError) for any other."""

    def __init__(self, path: str | Path, max_array_items: int | None = None) -> None:
        self.layout: GGUFLayout = read_gguf(path)
        if max_array_items is not None and self.layout.array_items > max_array_items:
            raise GGUFFormatError(f"{self.layout.array_items} metadata array items, more than the "
                                  f"{max_array_items} this kind of file holds")
        super().__init__(path, "r")

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        ids = {q.id for q in custom_types()}
        upstream = [f for f in fields if int(f.parts[4][0]) not in ids]
        super()._build_tensors(start_offs, upstream)
        if len(upstream) == len(fields):
            return
        known = {t.name: t for t in self.tensors}
        tensors = []
        for field in fields:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = str(bytes(name_data), encoding="utf-8")
            if name in known:
                tensors.append(known[name])
                continue
            if any(t.name == name for t in tensors):
                raise ValueError(f"Found duplicated tensor with name {name}")
            q = by_id(int(raw_dtype[0]))
            n_elems = int(np.prod(dims))
            np_dims = tuple(reversed(dims.tolist()))
            if np_dims[-1] % q.block_size:
                raise ValueError(f"tensor {name}: row of {np_dims[-1]} is not a multiple of {q.name}'s block {q.block_size}")
            n_bytes = n_elems // q.block_size * q.type_size
            byte_shape = (*np_dims[:-1], np_dims[-1] // q.block_size * q.type_size)
            data_offs = int(start_offs + offset_tensor[0])
            tensors.append(ReaderTensor(name=name, tensor_type=CustomGGMLType(q.id), shape=dims,  # type: ignore[arg-type]
                                        n_elements=n_elems, n_bytes=n_bytes, data_offset=data_offs,
                                        data=self._get(data_offs, np.uint8, n_bytes).reshape(byte_shape),
                                        field=field))
        self.tensors = tensors


def custom_type_names(path: str | Path) -> list[str]:
    """Names of the custom (patched-llama.cpp-only) tensor types a GGUF file uses, without reading tensor data."""
    ids = {q.id: q.name for q in custom_types()}
    return sorted({ids[t.type_id] for t in read_gguf(path).tensors if t.type_id in ids})
