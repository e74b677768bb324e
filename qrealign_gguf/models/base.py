"""What a model family must tell the converter. One subclass per family, one file each.

A family maps HF tensor names to GGUF names (via gguf-py's TensorNameMap), applies exact per-tensor
transforms llama.cpp expects (Q/K permutation for llama, +1 on gemma norms, ...), and writes the
hparams and tokenizer metadata llama.cpp needs. It knows nothing about quantization.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np

from ..hf_model import HFModel


@dataclass
class TensorSource:
    """One GGUF tensor to write, loaded lazily."""
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # row-major shape as written; for matrices (rows, cols), cols = ggml ne[0]
    load: Callable[[], np.ndarray]  # float32 values with every family transform applied
    hf_name: str = ""  # source tensor (for messages and imatrix lookup)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2


class ModelFamily(ABC):
    arch: ClassVar[str]  # GGUF architecture name, e.g. "llama"
    hf_architectures: ClassVar[tuple[str, ...]]  # config.json "architectures" values handled

    def __init__(self, model: HFModel) -> None:
        self.model = model

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg("num_hidden_layers", "n_layers"))

    @abstractmethod
    def add_metadata(self, w: gguf.GGUFWriter) -> None:
        """Write general.*, <arch>.* hparams and tokenizer.* keys."""

    @abstractmethod
    def tensors(self) -> Iterator[TensorSource]:
        """All tensors in file order, with GGUF names and transforms applied."""

    def validate(self) -> None:
        """Raise InputError for configs this family cannot convert faithfully (called before any work)."""
