"""A Hugging Face model directory read lazily: config, tokenizer files, safetensors tensors.

Nothing is loaded until a tensor is asked for, and then only that tensor; this is what keeps the
converter's peak memory at "largest tensor + its encoding". What the folder claims is checked when it is
opened: the shard index against the shards, and every safetensors header entry against the file (the
format's own rules, bounded so that a hostile header cannot make us allocate or loop without limit).
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

# safetensors dtype -> bytes per element, for every dtype whose layout we can check
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# dtypes load() turns into float32 exactly -> numpy dtype of the stored bytes (bf16 is read as uint16 and widened)
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
# bounds on what an untrusted file may make us read or loop over (safetensors' own header limit is 100 MB)
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_BYTES = 100_000_000  # config.json, model.safetensors.index.json
MAX_RANK = 8
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def show(name: str) -> str:
    """A name from an untrusted file, safe for a one-line message (no newlines, bounded length)."""
    text = name if name.isprintable() else repr(name)
    return text if len(text) <= 120 else text[:117] + "..."


class HFModel:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path} is not a directory; pass a Hugging Face model folder")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise InputError(f"{self.path} has no config.json; pass a Hugging Face model folder (with config.json and *.safetensors)")
        self.config: dict[str, Any] = read_json(cfg, "fix or re-export the model")
        if not isinstance(self.config, dict):
            raise InputError(f"{cfg} holds a JSON {_json_type(self.config)}, not an object; fix or re-export the model")
        index = self.path / INDEX_FILE
        if index.is_file():  # a sharded checkpoint: the index's weight_map is the truth
            self._entries = _read_indexed(self.path, index)
        else:
            self._entries = _read_unindexed(self.path)

    # -- config -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures")
        return str(archs[0]) if isinstance(archs, list) and archs else str(self.config.get("model_type", "?"))

    @property
    def text_config(self) -> dict[str, Any]:
        """The config of the language model: text_config for multimodal wrappers, else config.json itself."""
        text = self.config.get("text_config")
        return text if isinstance(text, dict) else self.config

    def cfg(self, *keys: str, default: Any = None) -> Any:
        """First present config key among `keys` (text_config is searched too, for multimodal wrappers)."""
        for src in (self.config, self.text_config):
            for k in keys:
                if k in src and src[k] is not None:
                    return src[k]
        return default

    def file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None

    def json(self, name: str) -> Any:
        p = self.file(name)
        return read_json(p, "fix or re-export the model") if p else None

    # -- tensors ------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype name (F32, BF16, I64, ...)."""
        return self._entries[name].dtype

    def has(self, name: str) -> bool:
        return name in self._entries

    def load(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor as float32, or only its rows [r0, r1) along the first axis, read with plain file I/O into a
        fresh buffer (row-major storage: those rows are one contiguous span of the file).

        No mmap and no torch: the only memory held is what was asked for, so peak RSS stays at the largest
        tensor (or row chunk) plus its encoding however big the model is."""
        e = self._entries[name]
        if e.dtype not in FLOAT_DTYPES:
            raise InputError(f"tensor {show(name)} in {e.file.name} is stored as {e.dtype}; a weight must be one of "
                             f"{'/'.join(FLOAT_DTYPES)}")
        dt = np.dtype(FLOAT_DTYPES[e.dtype])
        shape, start = e.shape, 0
        if rows is not None:
            r0, r1 = rows
            if not (e.shape and 0 <= r0 <= r1 <= e.shape[0]):  # a caller's bug, not the file's
                raise ValueError(f"rows {rows} outside tensor {name} of shape {e.shape}")
            row = math.prod(e.shape[1:])
            shape, start = (r1 - r0, *e.shape[1:]), r0 * row
        count = math.prod(shape)
        with open(e.file, "rb") as fh:
            fh.seek(e.offset + start * dt.itemsize)
            raw = np.fromfile(fh, dtype=dt, count=count)
        if raw.size != count:
            raise InputError(f"cannot read tensor {show(name)} from {e.file.name}: the file is truncated")
        if e.dtype == "BF16":  # bf16 is the top half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False).reshape(shape)


# -- reading untrusted files: every claim is checked against the file before it is used --------------------------
def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated key would otherwise let the last one win silently."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {show(k)} appears twice")
        out[k] = v
    return out


def read_json(path: Path, fix: str) -> Any:
    """A JSON file of bounded size, with repeated keys refused; `fix` says what to do when it is broken."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InputError(f"{path} is larger than {MAX_JSON_BYTES // 10**6} MB; it cannot be a real {path.name}")
        return json.loads(path.read_bytes(), object_pairs_hook=_unique_keys)
    except OSError as e:
        raise InputError(f"cannot read {path} ({e.strerror}); check the file's permissions") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, repeated key, absurd nesting
        raise InputError(f"{path} is not valid JSON ({str(e) or 'nested too deeply'}); {fix}") from None


def _read_unindexed(folder: Path) -> dict[str, _Entry]:
    """Every *.safetensors file in the folder; a tensor name may occur only once among them."""
    files = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    if not files:
        hint = " (PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)" if any(folder.glob("*.bin")) else ""
        raise InputError(f"{folder} has no *.safetensors files{hint}")
    _check_shard_set(files)
    entries: dict[str, _Entry] = {}
    for f in files:
        for name, e in _read_header(f).items():
            if name in entries:
                raise InputError(f"tensor {show(name)} is in both {entries[name].file.name} and {f.name}; remove the "
                                 "stray file (a checkpoint holds each tensor once)")
            entries[name] = e
    return entries


def _check_shard_set(files: list[Path]) -> None:
    """Shards named <stem>-00002-of-00003.safetensors without an index: all N of them must be there."""
    groups: dict[tuple[str, int], list[Path]] = {}
    for f in files:
        if m := _SHARD_NAME.match(f.name):
            groups.setdefault((m.group(1), int(m.group(3))), []).append(f)
    for (stem, total), got in groups.items():
        if len(got) != total:
            raise InputError(f"only {len(got)} of the {total} shards {stem}-*-of-{total:05d}.safetensors are in "
                             f"{files[0].parent}; download the missing shards (and {INDEX_FILE})")


def _read_indexed(folder: Path, index: Path) -> dict[str, _Entry]:
    """The shards that the index names, which must hold exactly the tensors it assigns to them."""
    fix = f"re-download {INDEX_FILE} with its shards"
    data = read_json(index, fix)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index} has no weight_map object (tensor name -> shard file); {fix}")
    shards = sorted(set(weight_map.values()))
    for s in shards:
        if Path(s).name != s or not s.endswith(".safetensors"):
            raise InputError(f"{index.name} names shard {show(s)}, which is not a .safetensors file in the model "
                             f"folder; {fix}")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"shard {show(missing[0])}{more} listed in {index.name} is missing from {folder}; download "
                         "the missing shard(s)")
    entries: dict[str, _Entry] = {}
    for s in shards:
        for name, e in _read_header(folder / s).items():
            listed = weight_map.get(name)
            if listed != s:
                where = f"puts it in {show(listed)}" if listed is not None else "does not list it"
                raise InputError(f"{s} holds tensor {show(name)} but {index.name} {where}; the index and the shards "
                                 f"do not belong together: {fix}")
            entries[name] = e
    for name, s in weight_map.items():
        if name not in entries:
            raise InputError(f"{index.name} puts tensor {show(name)} in {show(s)}, but that shard does not hold it; "
                             f"{fix}")
    return entries


def _json_type(v: Any) -> str:
    names = {str: "string", list: "array", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_header(f: Path) -> dict[str, _Entry]:
    """Validate a safetensors header against the file before anything else is read: every entry well formed,
    every tensor's bytes exactly shape x dtype size, and the tensors tiling the data area with no overlap or gap
    (the format's rule; otherwise a tensor could silently read another one's bytes)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if not 0 < n <= MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is not in 1..{MAX_HEADER_BYTES}")
            if 8 + n > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(n), object_pairs_hook=_unique_keys)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except OSError as e:
        raise InputError(f"cannot read {f} ({e.strerror}); check the file's permissions") from None
    except (ValueError, RecursionError) as e:  # also bad JSON, bad UTF-8, repeated names, absurd nesting
        raise InputError(f"{f.name} is not a valid safetensors file ({str(e) or 'nested too deeply'}); the file is "
                         "corrupt or truncated") from None
    base, data_size = 8 + n, size - 8 - n
    out: dict[str, _Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = _check_entry(f, name, info, data_size)
        spans.append((start, end, name))
        out[name] = _Entry(f, info["dtype"], tuple(info["shape"]), base + start)
    pos, prev = 0, ""
    for start, end, name in sorted(spans):
        if start < pos:
            raise InputError(f"{f.name}: tensor {show(name)} overlaps tensor {show(prev)} (data_offsets {start} < "
                             f"{pos}); the header is corrupt")
        if start > pos:
            raise InputError(f"{f.name}: {start - pos} bytes before tensor {show(name)} belong to no tensor; the "
                             "header is corrupt")
        pos, prev = end, name
    if pos != data_size:
        raise InputError(f"{f.name}: {data_size - pos} bytes after the last tensor belong to no tensor; the header "
                         "is corrupt or the file was appended to")
    return out


def _check_entry(f: Path, name: str, info: Any, data_size: int) -> tuple[int, int]:
    """One header entry: an object with a known dtype, a shape of counts, and offsets that hold exactly it."""
    where = f"{f.name}: tensor {show(name)}"
    if not isinstance(info, dict):
        raise InputError(f"{where}: the header entry is a JSON {_json_type(info)}, not an object; the file is corrupt")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise InputError(f"{where} has no {', '.join(missing)} in the header; the file is corrupt")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_SIZES:
        raise InputError(f"{where} has unsupported dtype {show(str(dtype))}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(d) for d in shape):
        raise InputError(f"{where} has shape {show(json.dumps(shape))}; a shape is a list of at most {MAX_RANK} "
                         "non-negative integers: the file is corrupt")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise InputError(f"{where} has data_offsets {show(json.dumps(offsets))}; they must be two non-negative "
                         "integers: the file is corrupt")
    start, end = offsets
    if start > end:
        raise InputError(f"{where} has reversed data_offsets [{start}, {end}]; the file is corrupt")
    if end > data_size:
        raise InputError(f"{f.name} is truncated: tensor {show(name)} ends at data byte {end}, the file holds "
                         f"{data_size}")
    need = math.prod(shape) * _ST_SIZES[dtype]
    if end - start != need:
        raise InputError(f"{where}: data_offsets [{start}, {end}] hold {end - start} bytes but shape "
                         f"{'x'.join(map(str, shape)) or 'scalar'} of {dtype} needs {need}; the header is corrupt")
    return start, end
