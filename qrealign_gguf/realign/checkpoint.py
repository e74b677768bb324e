"""Per-layer checkpoints so a crashed or interrupted realignment continues where it stopped.

A checkpoint directory holds fingerprint.json (everything the result depends on: model files, probes,
prompts, settings, tensor types) and layer_NNN.safetensors (the packed GGUF bytes of that layer's tensors
plus its stats). A different fingerprint means different work: the old layers are discarded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_files_digest(model_dir: str | Path) -> str:
    """Names, sizes and safetensors headers of the weight files: changes whenever the weights are re-saved."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(min(n, 1 << 24)))
    return h.hexdigest()


class Checkpoints:
    def __init__(self, directory: str | Path, fp: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "fingerprint.json"
        old = json.loads(meta.read_text()).get("fingerprint") if meta.exists() else None
        self.resumed = old == fp
        if old is not None and old != fp:  # stale work for other inputs or settings
            for f in self.dir.glob("layer_*.safetensors"):
                f.unlink()
        meta.write_text(json.dumps({"fingerprint": fp}))

    def _path(self, layer: int) -> Path:
        return self.dir / f"layer_{layer:03d}.safetensors"

    def done(self, layer: int) -> bool:
        return self._path(layer).exists()

    def save(self, layer: int, packed: dict[str, np.ndarray], stats: Any) -> None:
        tmp = self._path(layer).with_suffix(".tmp")
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in packed.items()}, str(tmp),
                  metadata={"stats": json.dumps(dataclasses.asdict(stats))})
        os.replace(tmp, self._path(layer))  # a crash mid-save leaves no half layer

    def load(self, layer: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        from safetensors import safe_open
        with safe_open(str(self._path(layer)), framework="pt") as f:
            stats = json.loads((f.metadata() or {}).get("stats", "{}"))
        return {k: v.numpy() for k, v in load_file(str(self._path(layer))).items()}, stats

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class PackedLayers(Mapping[str, np.ndarray]):
    """Every realigned tensor, read from its layer's checkpoint file when asked for: the packed bytes of the whole
    model (several GB for an 8B model) are never held at once; the writer takes one tensor at a time."""

    def __init__(self, ckpt: Checkpoints, where: dict[str, int]) -> None:
        self._ckpt, self._where = ckpt, dict(where)  # tensor name -> layer

    def __getitem__(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        layer = self._where[name]  # KeyError for a tensor that was not realigned, as a dict would
        with safe_open(str(self._ckpt._path(layer)), framework="pt") as f:  # noqa: SLF001 - same module
            return f.get_tensor(name).numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
