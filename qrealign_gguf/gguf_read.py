"""gguf-py's GGUFReader, taught qrealign's custom tensor types (formats/types.py: QR4_KO = 240, ...).

gguf-py maps every tensor's type id through its GGMLQuantizationType enum and raises on ids it does not
know. `GGUFReader` here reads the upstream tensors exactly as gguf-py does and the custom ones as raw
uint8 blocks (rows x row bytes) with `tensor_type` a CustomGGMLType (.name "QR4_KO", .value 240).
"""
from __future__ import annotations

import gguf
import numpy as np
from gguf.gguf_reader import ReaderField, ReaderTensor

from .formats.types import CustomGGMLType, by_id, custom_types


class GGUFReader(gguf.GGUFReader):
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


def custom_type_names(path) -> list[str]:  # noqa: ANN001 - str | Path
    """Names of the custom (patched-llama.cpp-only) tensor types a GGUF file uses, without reading tensor data."""
    r = GGUFReader(path)
    return sorted({t.tensor_type.name for t in r.tensors if isinstance(t.tensor_type, CustomGGMLType)})
