"""HF safetensors directory -> GGUF, streaming one tensor at a time.

Order of work: read config and tensor headers, pick the family, plan every tensor's type, check every
input (imatrix, output path), then write the header and encode + write each tensor in turn. Output goes to
a temporary directory beside the target and is renamed into place only when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from . import __version__
from .errors import InputError
from .formats import codec
from .formats.types import QType
from .hf_model import HFModel
from .imatrix import check_imatrix, load_imatrix
from .models import family_for
from .models.base import ModelFamily, TensorSource
from .gguf_read import GGUFReader
from .plan import FILE_TYPE, PlanInput, plan_types, resolve_outtype

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
class PlannedTensor:
    source: TensorSource
    qtype: QType
    nbytes: int


@dataclass
class Plan:
    family: ModelFamily
    outtype: str
    tensors: list[PlannedTensor]
    output: Path

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.source.shape)) for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(self.n_params, 1)

    @property
    def custom_types(self) -> list[str]:
        """qrealign's own tensor types in this plan (only the patched llama.cpp runs the file)."""
        return sorted({t.qtype.name for t in self.tensors if t.qtype.custom})


@dataclass
class ConvertResult:
    files: list[Path]
    plan: Plan
    seconds: float


def _nbytes(t: QType, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * t.row_bytes(shape[-1])


def default_filename(family: ModelFamily, outtype: str, n_params: int, custom: bool) -> str:
    """<Name>-<Size>-<TYPE>.gguf (gguf-py's naming convention); the size is left out if the name has it.
    Files holding custom tensor types (QR4_KO, QR5_K128) end in .qrealign.gguf: the name says stock llama.cpp
    will not load them."""
    name = family.model.path.resolve().name
    size = gguf.size_label(n_params, 0, 0, 0)
    ext = ".qrealign.gguf" if custom else ".gguf"
    return f"{name}-{outtype}{ext}" if size.lower() in name.lower() else f"{name}-{size}-{outtype}{ext}"


def make_plan(model_dir: str | Path, output: str | Path, opts: ConvertOptions) -> Plan:
    """Everything decided and checked before a byte is written."""
    outtype = _checked_outtype(opts.outtype)
    model = HFModel(model_dir)
    family = family_for(model)
    family.validate()
    sources = list(family.tensors())
    types = plan_types(outtype, [PlanInput(s.name, s.shape) for s in sources], n_layer=family.n_layers,
                       n_head=family.n_head, n_head_kv=family.n_head_kv,
                       has_imatrix=opts.imatrix is not None or opts.importance is not None, pure=opts.pure)
    tensors = [PlannedTensor(s, types[s.name], _nbytes(types[s.name], s.shape)) for s in sources]
    out = Path(output)
    if out.is_dir():
        out = out / default_filename(family, outtype, sum(int(np.prod(s.shape)) for s in sources),
                                     custom=any(t.custom for t in types.values()))
    return Plan(family, outtype, tensors, out)


def _checked_outtype(name: str) -> str:
    try:
        return resolve_outtype(name)
    except ValueError as e:
        raise InputError(str(e)) from None


def _check_output(out: Path, force: bool) -> None:
    if out.suffix != ".gguf":
        raise InputError(f"output {out} must end in .gguf (or be an existing directory)")
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent} (permission denied); choose another output path")


def resolve_encode_device(name: str) -> str:
    """--device for the block encoders; a CUDA request that cannot run is a user error, not a traceback."""
    if name == "cpu":
        return "cpu"
    from .formats import cuda_codec

    try:
        return cuda_codec.resolve_device(name)
    except (cuda_codec.CudaUnavailable, ValueError) as e:
        raise InputError(f"--device {name}: {e}") from None


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
    """A JSON value as the matching GGUF type (bool before int: bool is an int in Python)."""
    if isinstance(val, bool):
        w.add_bool(key, val)
    elif isinstance(val, int):
        (w.add_uint32 if 0 <= val < 2**32 else w.add_int64)(key, val)
    elif isinstance(val, float):
        w.add_float32(key, val)
    elif isinstance(val, str):
        w.add_string(key, val)
    elif isinstance(val, list) and val:
        w.add_array(key, val)
    else:
        raise InputError(f"metadata key {key}: value {val!r} has no GGUF type (use string, number, bool or a list)")


def load_metadata_overrides(path: str | Path) -> dict[str, Any]:
    """--metadata override.json: {"general.name": "...", "general.license": "...", ...}."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"metadata file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"metadata file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"metadata file {path} must hold a JSON object of GGUF keys")
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


def convert(model_dir: str | Path, output: str | Path, opts: ConvertOptions | None = None,
            progress: Progress | None = None, plan: Plan | None = None) -> ConvertResult:
    opts = opts or ConvertOptions()
    t0 = time.perf_counter()
    plan = plan or make_plan(model_dir, output, opts)
    _check_output(plan.output, opts.force)
    importance = dict(opts.importance or {})
    device = resolve_encode_device(opts.device) if any(t.qtype.native for t in plan.tensors) else "cpu"
    if opts.imatrix is not None:
        importance.update(load_imatrix(opts.imatrix))
    if importance:
        check_imatrix(importance, {t.source.name: t.source.shape for t in plan.tensors},
                       str(opts.imatrix or "from --calib"))

    out = plan.output
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", suffix=".partial", dir=out.parent or "."))
    try:
        w = gguf.GGUFWriter(tmpdir / out.name, arch=plan.family.arch, split_max_size=opts.split_max_size)
        plan.family.add_metadata(w)
        _provenance(w, plan, opts)
        for key, val in opts.metadata.items():
            _add_typed(w, key, val)
        for t in plan.tensors:
            w.add_tensor_info(t.source.name, t.source.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype.ggml)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        for i, t in enumerate(plan.tensors):
            x = t.source.load()
            if not np.isfinite(x).all():
                raise InputError(f"tensor {t.source.hf_name or t.source.name} contains NaN or Inf values; "
                                 "the checkpoint is broken, fix it before converting")
            pre = (opts.packed or {}).get(t.source.name)
            data = pre if pre is not None else _encode(x, t.qtype, importance.get(t.source.name), opts.threads, device)
            del x
            if data.nbytes != t.nbytes:  # an internal invariant, not a user error
                raise AssertionError(f"{t.source.name}: encoded {data.nbytes} bytes, planned {t.nbytes}")
            w.write_tensor_data(data.reshape(-1).view(np.uint8))
            done += t.nbytes
            if progress:
                progress(t.source.name, i + 1, len(plan.tensors), done, plan.total_bytes)
        w.close()
        files = sorted(tmpdir.iterdir())
        if opts.packed:
            verify_packed(files, opts.packed)
        final = []
        for f in files:
            os.replace(f, out.parent / f.name)
            final.append(out.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ConvertResult(final, plan, time.perf_counter() - t0)
