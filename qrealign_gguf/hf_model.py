"""A Hugging Face model directory read lazily: config, tokenizer files, memory-mapped safetensors.

Nothing is loaded until a tensor is asked for, and then only that tensor; this is what keeps the
converter's peak memory at "largest tensor + its encoding".
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

# safetensors dtype -> numpy dtype of the stored bytes (bf16 is read as uint16 and widened exactly)
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


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
        self._entries: dict[str, _Entry] = {}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            hint = " (PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)" if any(self.path.glob("*.bin")) else ""
            raise InputError(f"{self.path} has no *.safetensors files{hint}")
        for f in files:
            self._entries.update(_read_header(f))

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
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def has(self, name: str) -> bool:
        return name in self._entries

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32, read with plain file I/O into a fresh buffer.

        No mmap and no torch: the only memory held is this tensor, so peak RSS stays at the largest
        tensor plus its encoding however big the model is."""
        e = self._entries[name]
        dt = np.dtype(_ST_DTYPES[e.dtype])
        count = int(np.prod(e.shape)) if e.shape else 1
        with open(e.file, "rb") as fh:
            fh.seek(e.offset)
            raw = np.fromfile(fh, dtype=dt, count=count)
        if raw.size != count:
            raise InputError(f"cannot read tensor {name} from {e.file.name}: the file is truncated")
        if e.dtype == "BF16":  # bf16 is the top half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False).reshape(e.shape)


def _read_header(f: Path) -> dict[str, _Entry]:
    """Validate a safetensors header against the file size before anything else is read."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{f.name} is not a valid safetensors file ({e}); the file is corrupt or truncated") from None
    out: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if 8 + n + end > size:
            raise InputError(f"{f.name} is truncated: tensor {name} ends at byte {8 + n + end}, file has {size}")
        if info["dtype"] not in _ST_DTYPES:
            raise InputError(f"{f.name}: tensor {name} has unsupported dtype {info['dtype']}")
        out[name] = _Entry(f, info["dtype"], tuple(info["shape"]), 8 + n + start)
    return out
