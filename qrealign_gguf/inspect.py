"""Read a GGUF file's metadata and tensor table without loading tensor data (gguf_file's bounded walk: no gguf-py
decoding of the vocabulary, so a 150k-token model's table is read in a fraction of a second)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .errors import InputError
from .formats.types import CUSTOM_IDS, by_id
from .gguf_file import GGUFFormatError, read_gguf


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


def read_gguf_summary(path: str | Path) -> GGUFSummary:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is not a file (a GGUF file is expected)" if path.exists() else f"{path} does not exist")
    try:
        layout = read_gguf(path)
    except (GGUFFormatError, OSError) as e:
        raise InputError(f"{path} is not a readable GGUF file ({e})") from None
    meta = {k: v.display() for k, v in layout.kv.items()}
    rows = [TensorRow(t.name, _type_name(t.type_id), t.shape, t.nbytes, t.type_id in CUSTOM_IDS)
            for t in layout.tensors]
    return GGUFSummary(meta, rows)


def _type_name(type_id: int) -> str:
    """read_gguf has checked the id is one gguf-py or qrealign knows."""
    return by_id(type_id).name if type_id in CUSTOM_IDS else gguf.GGMLQuantizationType(type_id).name
