"""Read a GGUF file's metadata and tensor table without loading tensor data."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .errors import InputError
from .formats.types import CustomGGMLType
from .gguf_read import GGUFReader


@dataclass
class TensorRow:
    name: str
    type_name: str
    shape: tuple[int, ...]  # row-major (numpy order)
    nbytes: int
    custom: bool = False  # one of qrealign's own types (QR4_KO, ...)


@dataclass
class GGUFSummary:
    metadata: dict[str, str]
    tensors: list[TensorRow] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / max(self.n_params, 1)

    @property
    def custom_types(self) -> list[str]:
        return sorted({t.type_name for t in self.tensors if t.custom})

    @property
    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t.type_name for t in self.tensors).most_common())


def _value(field_: gguf.ReaderField) -> str:
    if not field_.types:
        return "?"
    if field_.types[0] == gguf.GGUFValueType.ARRAY:
        n = len(field_.data)
        sub = field_.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            items = [bytes(field_.parts[i]).decode("utf-8", "replace") for i in field_.data[:8]]
        else:
            items = [str(field_.parts[i][0]) for i in field_.data[:8]]
        return f"[{n} x {sub.name}] " + ", ".join(items) + (", ..." if n > 8 else "")
    v = field_.contents()
    return str(v)


def read_gguf_summary(path: str | Path) -> GGUFSummary:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        r = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a valid GGUF"
        raise InputError(f"{path} is not a readable GGUF file ({e})") from None
    meta = {k: _value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    rows = [TensorRow(t.name, t.tensor_type.name, tuple(int(x) for x in reversed(t.shape)), int(t.n_bytes),
                      isinstance(t.tensor_type, CustomGGMLType))
            for t in r.tensors]
    return GGUFSummary(meta, rows)
