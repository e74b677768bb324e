"""HF safetensors directory -> GGUF, streaming one tensor at a time.

Order of work: read config and tensor headers, pick the family, plan every tensor's type, check every
input (imatrix, output path), then write the header and encode + write each tensor in turn. Output goes to
a temporary directory beside the target and is renamed into place only when complete.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from . import __version__
from .checks import check_numbers
from .device import resolve_device
from .errors import InputError
from .formats import codec
from .formats.types import QType
from .gguf_metadata import check_override, gguf_value
from .gguf_read import GGUFReader
from .hf_model import read_json
from .imatrix import check_imatrix, load_imatrix
from .output import (WRITER_LOCK, add_tensor_infos, check_output, existing_outputs, lock_partial_dir,
                     make_partial_dir, move_into_place, remove_stale_partials)
from .plan import FILE_TYPE, Plan, PlannedTensor, make_plan

# progress(tensor_name, index, total, bytes_written_so_far, total_bytes)
Progress = Callable[[str, int, int, int, int], None]


@dataclass
class ConvertOptions:
    outtype: str = "Q8_0"
    imatrix: str | Path | None = None  # llama.cpp imatrix GGUF
    importance: dict[str, np.ndarray] | None = None  # already-computed importance (e.g. from --calib)
    pure: bool = False  # every matrix in the base type (llama-quantize --pure)
    split_max_size: int = 0  # bytes per shard, 0 = one file
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF key overrides
    threads: int = 0
    force: bool = False
    extra_provenance: dict[str, Any] = field(default_factory=dict)  # qrealign.* keys from callers
    packed: dict[str, np.ndarray] | None = None  # pre-encoded GGUF bytes per tensor (realignment), written as is
    device: str = "cpu"  # encoder: cpu (C codec), cuda, or auto (cuda when the CUDA codec can run)


@dataclass
class ConvertResult:
    files: list[Path]
    plan: Plan
    seconds: float
    removed: list[Path] = field(default_factory=list)  # leftovers of earlier runs on this target that were deleted
    provenance: dict[str, Any] = field(default_factory=dict)  # the qrealign.* keys written (realignment, imatrix)


def _encode(x: np.ndarray, t: QType, importance: np.ndarray | None, threads: int, device: str = "cpu") -> np.ndarray:
    if t.name == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if t.name == "F16":
        return codec.to_f16(x)
    if t.name == "BF16":
        return codec.to_bf16(x)
    if device == "cuda":  # same bytes as the C codec (tests/test_cuda_codec.py)
        from .formats import cuda_codec
        return cuda_codec.encode(t, x.reshape(-1, x.shape[-1]), importance, device="cuda")
    return codec.quantize(x.reshape(-1, x.shape[-1]), t, imatrix=importance, threads=threads)


def _provenance(w: gguf.GGUFWriter, plan: Plan, opts: ConvertOptions) -> None:
    w.add_string("general.quantized_by", f"qrealign-gguf {__version__}")
    w.add_uint32("general.file_type", FILE_TYPE[plan.outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("qrealign.version", __version__)
    w.add_string("qrealign.outtype", plan.outtype)
    w.add_bool("qrealign.pure", opts.pure)
    w.add_string("qrealign.source", plan.family.model.path.name)
    if opts.imatrix is not None:
        digest = hashlib.sha256(Path(opts.imatrix).read_bytes()).hexdigest()[:16]
        w.add_string("qrealign.imatrix", f"{Path(opts.imatrix).name} sha256:{digest}")
    for key, val in opts.extra_provenance.items():
        _add_typed(w, f"qrealign.{key}", val)


def _add_typed(w: gguf.GGUFWriter, key: str, val: Any) -> None:
    """A JSON value as the GGUF type llama.cpp reads for the key (gguf_metadata: the type the family already wrote,
    else gguf-py's writer's type for it, else inferred); a key the family wrote is replaced in place."""
    if key == "general.architecture" and val != w.arch:  # llama.cpp picks the graph by it: never another one
        raise InputError(f"metadata key general.architecture is {w.arch!r} for this model, not {val!r}; leave it out")
    kv = w.kv_data[0]  # gguf-py keeps every key in the first shard's table
    tokens = kv.get("tokenizer.ggml.tokens")
    kv[key] = gguf_value(key, val, w.arch, kv.get(key), len(tokens.value) if tokens is not None else None)


def load_metadata_overrides(path: str | Path) -> dict[str, Any]:
    """--metadata override.json: {"general.name": "...", "general.license": "...", ...}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"metadata file {path} does not exist")
    data = read_json(path, "fix the metadata file")  # bounded, a key given twice refused
    if not isinstance(data, dict):
        raise InputError(f"metadata file {path} must hold a JSON object of GGUF keys")
    for key, val in data.items():  # everything that does not need the model; the rest when the header is built
        check_override(key, val)
    return data


def verify_packed(files: list[Path], packed: dict[str, np.ndarray]) -> None:
    """Read the written file(s) back: every pre-encoded tensor must be there byte for byte."""
    seen = 0
    for f in files:
        for t in GGUFReader(f).tensors:
            want = packed.get(t.name)
            if want is None:
                continue
            got = np.asarray(t.data).reshape(-1).view(np.uint8)
            if not np.array_equal(got, np.ascontiguousarray(want).reshape(-1).view(np.uint8)):
                raise AssertionError(f"{t.name}: written bytes differ from the realigned blocks")
            seen += 1
    if seen != len(packed):
        raise AssertionError(f"only {seen} of {len(packed)} realigned tensors found in the written file")


# tensors larger than this (as float32) are read, encoded and written in row chunks of about this size: the
# embedding and output matrices of a large vocabulary (545 MB on Qwen2.5-0.5B, 2.1 GB on Llama-3-8B) would
# otherwise set the converter's peak memory on their own
CHUNK_BYTES = 32 << 20


def _chunked(t: PlannedTensor) -> bool:
    return t.source.load_rows is not None and 4 * math.prod(t.source.shape) > CHUNK_BYTES


def load_checked(t: PlannedTensor, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor (or its rows [r0, r1)) as float32, refused when it holds NaN or Inf."""
    x = t.source.load() if rows is None else t.source.load_rows(*rows)
    if not np.isfinite(x).all():
        raise InputError(f"tensor {t.source.hf_name or t.source.name} contains NaN or Inf values; "
                         "the checkpoint is broken, fix it before converting")
    return x


class _RowChunks:
    """One tensor's encoded bytes, produced chunk by chunk while gguf-py writes it: GGUFWriter.write_tensor_data
    only asks its argument for `nbytes` and `tofile(file)`, so the whole tensor never sits in memory at once."""

    def __init__(self, t: PlannedTensor, encode: Callable[[int, int], np.ndarray]) -> None:
        self.t, self.encode, self.nbytes = t, encode, t.nbytes
        rows, row = t.source.shape[0], 4 * math.prod(t.source.shape[1:])
        self.step = max(1, CHUNK_BYTES // row)
        self.rows = rows

    def tofile(self, f: Any) -> None:
        written = 0
        for r0 in range(0, self.rows, self.step):
            data = self.encode(r0, min(r0 + self.step, self.rows))
            data.reshape(-1).view(np.uint8).tofile(f)
            written += data.nbytes
        if written != self.nbytes:  # an internal invariant, not a user error
            raise AssertionError(f"{self.t.source.name}: encoded {written} bytes in chunks, planned {self.nbytes}")


def convert(model_dir: str | Path, output: str | Path, opts: ConvertOptions | None = None,
            progress: Progress | None = None, plan: Plan | None = None) -> ConvertResult:
    """Write the GGUF file(s) of `plan` (made here when not given); `opts.packed` tensors are written as given and
    read back. The whole flow with importance and realignment is api.convert_model."""
    opts = opts or ConvertOptions()
    t0 = time.perf_counter()
    check_numbers(**{"--threads": (opts.threads, ">=0")})
    plan = plan or make_plan(model_dir, output, opts.outtype, pure=opts.pure,
                             has_imatrix=opts.imatrix is not None or opts.importance is not None)
    check_output(plan, split_max_size=opts.split_max_size, force=opts.force)
    for key, val in opts.metadata.items():  # API callers pass a dict that never went through the file loader
        check_override(key, val)
    importance = dict(opts.importance or {})
    device = resolve_device(opts.device, "encode") if any(t.qtype.native for t in plan.tensors) else "cpu"
    if opts.imatrix is not None:
        importance.update(load_imatrix(opts.imatrix))
    if importance:
        check_imatrix(importance, {t.source.name: t.source.shape for t in plan.tensors},
                       str(opts.imatrix or "from --calib"))

    out = plan.output
    cleaned = remove_stale_partials(out)  # every check passed: this run owns the target now
    tmpdir = make_partial_dir(out)
    lock_fd = -1
    try:
        lock_fd = lock_partial_dir(tmpdir)
        w = gguf.GGUFWriter(tmpdir / out.name, arch=plan.family.arch, split_max_size=opts.split_max_size)
        plan.family.add_metadata(w)
        _provenance(w, plan, opts)
        for key, val in opts.metadata.items():
            _add_typed(w, key, val)
        add_tensor_infos(w, plan)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        for i, t in enumerate(plan.tensors):
            pre = (opts.packed or {}).get(t.source.name)
            # every GGUF type encodes each row on its own, so row chunks give the same bytes as the whole tensor
            enc = functools.partial(_encode, t=t.qtype, importance=importance.get(t.source.name),
                                    threads=opts.threads, device=device)
            if pre is not None:
                data = pre
            elif _chunked(t):
                data = _RowChunks(t, lambda r0, r1, t=t, enc=enc: enc(load_checked(t, (r0, r1))))
            else:
                data = enc(load_checked(t))
            if data.nbytes != t.nbytes:  # an internal invariant, not a user error
                raise AssertionError(f"{t.source.name}: encoded {data.nbytes} bytes, planned {t.nbytes}")
            w.write_tensor_data(data if isinstance(data, _RowChunks) else data.reshape(-1).view(np.uint8))
            done += t.nbytes
            if progress:
                progress(t.source.name, i + 1, len(plan.tensors), done, plan.total_bytes)
        w.close()
        files = sorted(f for f in tmpdir.iterdir() if f.name != WRITER_LOCK)
        if opts.packed:
            verify_packed(files, opts.packed)
        final = move_into_place(files, out.parent, opts.force)
    except OSError as e:
        if e.errno is None:  # numpy's tofile reports a short write without errno (a full disk, quota or ulimit -f)
            raise InputError(f"{out}: the write stopped short ({e}): the disk, the quota or the file size limit is "
                             "probably exhausted; free some space or choose another output path") from None
        if e.filename is None:  # a failed write (ENOSPC, EFBIG, EDQUOT, EIO) names no file: name the output
            raise OSError(e.errno, e.strerror, str(out)) from None
        if Path(str(e.filename)).parent == tmpdir:  # the hidden file means nothing to the user
            raise OSError(e.errno, e.strerror, str(out.parent / Path(str(e.filename)).name)) from None
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if lock_fd >= 0:
            os.close(lock_fd)
    # with --force, what is left of an earlier run on this target (a single file, or shards of another count)
    # would sit beside the new file(s) as a second, stale model: it goes too
    stale = [f for f in existing_outputs(out) if f not in final] if opts.force else []
    for f in stale:
        f.unlink(missing_ok=True)
    return ConvertResult(final, plan, time.perf_counter() - t0, removed=[*cleaned, *stale],
                         provenance=dict(opts.extra_provenance))
