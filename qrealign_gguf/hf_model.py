"""A Hugging Face model directory read lazily: config, tokenizer files, memory-mapped safetensors.

Nothing is loaded until a tensor is asked for, and then only that tensor; this is what keeps the
converter's peak memory at "largest tensor + its encoding".
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from .errors import InputError

_ST_DTYPES = {"F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"}


class HFModel:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path} is not a directory; pass a Hugging Face model folder")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise InputError(f"{self.path} has no config.json; pass a Hugging Face model folder (with config.json and *.safetensors)")
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{cfg} is not valid JSON ({e.msg} at line {e.lineno}); fix or re-export the model") from None
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            hint = " (PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)" if any(self.path.glob("*.bin")) else ""
            raise InputError(f"{self.path} has no *.safetensors files{hint}")
        for f in files:
            for name, shape in _read_header(f).items():
                self._where[name] = f
                self._shapes[name] = shape
        self._handles: dict[Path, Any] = {}

    # -- config -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else str(self.config.get("model_type", "?"))

    def cfg(self, *keys: str, default: Any = None) -> Any:
        """First present config key among `keys` (text_config is searched too, for multimodal wrappers)."""
        for src in (self.config, self.config.get("text_config") or {}):
            for k in keys:
                if k in src and src[k] is not None:
                    return src[k]
        return default

    def file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None

    def json(self, name: str) -> dict[str, Any] | None:
        p = self.file(name)
        return json.loads(p.read_text()) if p else None

    # -- tensors ------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def has(self, name: str) -> bool:
        return name in self._where

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 (memory-mapped read; bf16/f16 upcast exactly)."""
        f = self._where[name]
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(str(f), framework="pt")
        try:
            t = h.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise InputError(f"cannot read tensor {name} from {f.name}: {e}; the file is corrupt or truncated") from None
        return t.float().numpy()


def _read_header(f: Path) -> dict[str, tuple[int, ...]]:
    """Validate a safetensors header against the file size before anything else is read."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{f.name} is not a valid safetensors file ({e}); the file is corrupt or truncated") from None
    out: dict[str, tuple[int, ...]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if 8 + n + end > size:
            raise InputError(f"{f.name} is truncated: tensor {name} ends at byte {8 + n + end}, file has {size}")
        if info["dtype"] not in _ST_DTYPES:
            raise InputError(f"{f.name}: tensor {name} has unsupported dtype {info['dtype']}")
        out[name] = tuple(info["shape"])
    return out
