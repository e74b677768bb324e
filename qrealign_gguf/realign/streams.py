"""Activation streams: the tensors (one per prompt, or per padded batch) at one decoder-layer boundary.

Layer-wise work (onload.py) keeps only the current layer's streams: its inputs and the outputs being written for
the next layer. A Store keeps them in memory (plain lists of the tensors, exactly what the whole-model path held)
or, with `--offload-dir`, spills each stream to one raw file and reads an item back only when it is asked for
(plain reads, no mmap: the page cache is not this process's RSS). The bytes are stored as they are, so the values
are identical either way.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import torch


class Stream(Sequence[torch.Tensor]):
    """Append-then-read sequence of CPU tensors, in memory (path None) or in one file."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._items: list[torch.Tensor] = []
        self._index: list[tuple[int, tuple[int, ...], np.dtype]] = []  # (byte offset, shape, dtype) per item
        self._fh = None
        self._end = 0

    @property
    def on_disk(self) -> bool:
        return self._path is not None

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        if self._path is None:
            self._items.append(t)
            return
        a = t.cpu().contiguous().numpy()
        if self._fh is None:
            self._fh = open(self._path, "wb")  # noqa: SIM115 - closed by drop()/flush-on-read
        a.tofile(self._fh)
        self._index.append((self._end, tuple(a.shape), a.dtype))
        self._end += a.nbytes

    def __len__(self) -> int:
        return len(self._items) if self._path is None else len(self._index)

    @overload
    def __getitem__(self, k: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, k: slice) -> Sequence[torch.Tensor]: ...

    def __getitem__(self, k: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        if self._path is None:
            return self._items[k]  # a slice is a plain list of the same tensors, as before streams existed
        if isinstance(k, slice):
            return View(self, range(len(self))[k])
        off, shape, dt = self._index[k]
        if self._fh is not None:
            self._fh.flush()
        a = np.fromfile(self._path, dtype=dt, count=math.prod(shape), offset=off)
        return torch.from_numpy(a.reshape(shape))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def drop(self) -> None:
        """Free the items (memory) or close and remove the file."""
        self._items = []
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        self._index = []


class View(Sequence[torch.Tensor]):
    """Items `idx` of a spilled stream, read on access and moved to `device` (what realign_layer indexes)."""

    def __init__(self, stream: Stream, idx: range, device: str | torch.device | None = None) -> None:
        self._s, self._idx, self._device = stream, idx, device

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, k):  # noqa: ANN001, ANN204 - int or slice, like a list
        if isinstance(k, slice):
            return View(self._s, self._idx[k], self._device)
        t = self._s[self._idx[k]]
        return t if self._device is None else t.to(self._device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def to(self, device: str | torch.device) -> View:
        return View(self._s, self._idx, device)


def on_device(xs: Sequence[torch.Tensor], device: str | torch.device) -> Sequence[torch.Tensor]:
    """xs moved to device: a list in memory (as the whole-model path did), a lazy view for a spilled stream."""
    if isinstance(xs, (View, Stream)) and (not isinstance(xs, Stream) or xs.on_disk):
        return (xs if isinstance(xs, View) else xs[:]).to(device)  # type: ignore[union-attr]
    return [x.to(device) for x in xs]


class Store:
    """Where a run's streams live: memory (directory None) or a private temporary directory under `directory`,
    removed by close() (use as a context manager)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.dir = None
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".qrealign-offload-", dir=directory))
        self._n = 0

    def stream(self, name: str) -> Stream:
        if self.dir is None:
            return Stream()
        self._n += 1
        return Stream(self.dir / f"{self._n:06d}-{name}.bin")

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
