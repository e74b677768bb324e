"""HF safetensors directory -> GGUF, streaming one tensor at a time.

Order of work: read config and tensor headers, pick the family, plan every tensor's type, check every
input (imatrix, output path), then write the header and encode + write each tensor in turn. Output goes to
a temporary directory beside the target and is renamed into place only when complete.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
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
from .gguf_metadata import check_override, gguf_value
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
    removed: list[Path] = field(default_factory=list)  # leftovers of earlier runs on this target that were deleted


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


# -- the output: planned file names, checks before any work, the partial directory, the final move ---------------
PARTIAL_SUFFIX = ".partial"
# inside a partial directory: a file flock-ed by the process writing there, so a later run can tell a dead run's
# leftovers (lock free) from a live one (lock held); the kernel drops the lock when the writer dies, even by SIGKILL
WRITER_LOCK = ".qrealign-writer.lock"


def _add_tensor_infos(w: gguf.GGUFWriter, plan: Plan) -> None:
    for t in plan.tensors:
        w.add_tensor_info(t.source.name, t.source.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype.ggml)


def output_files(plan: Plan, split_max_size: int) -> list[Path]:
    """The files convert will write: plan.output, or gguf-py's shards <stem>-00001-of-0000N.gguf beside it
    (the split is decided by the writer itself, from the same tensor sizes, so the names cannot drift)."""
    w = gguf.GGUFWriter(None, arch=plan.family.arch, split_max_size=split_max_size)
    _add_tensor_infos(w, plan)
    return w.format_shard_names(plan.output)


def _is_shard_of(name: str, stem: str) -> bool:
    """<stem>-00001-of-00003.gguf: a shard written by gguf-py for the target <stem>.gguf."""
    return re.fullmatch(re.escape(stem) + r"-\d{5}-of-\d{5}\.gguf", name) is not None


def _existing_outputs(out: Path) -> list[Path]:
    """Files of an earlier run on the same target: the single file and shard sets of any count."""
    parent = out.parent if str(out.parent) else Path(".")
    found = [out] if os.path.lexists(out) else []
    with os.scandir(parent) as it:
        found += sorted(parent / e.name for e in it if _is_shard_of(e.name, out.stem))
    return found


def check_output(plan: Plan, opts: ConvertOptions) -> list[Path]:
    """Refuse, before any long work, an output that cannot be written or would replace files without --force.
    Returns the files that will be written."""
    out = plan.output
    if out.suffix != ".gguf":
        raise InputError(f"output {out} must end in .gguf (or be an existing directory)")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"output directory {parent} is not a directory (a file of that name exists); "
                         "choose another output path")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist; create it first")
    if opts.split_max_size < 0:
        raise InputError(f"split size {opts.split_max_size} is negative; give a positive size or 0 for one file")
    if opts.threads < 0:
        raise InputError(f"threads {opts.threads} is negative; give a positive count or 0 for all cores")
    files = output_files(plan, opts.split_max_size)
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except OSError:  # not every file system says; the write itself will tell
        name_max = 255
    for f in files:
        if len(os.fsencode(f.name)) > name_max:
            raise InputError(f"output file name {f.name} is longer than this file system allows ({name_max} bytes); "
                             "choose a shorter output name")
    if not opts.force:
        old = _existing_outputs(out)
        if old:
            raise InputError(f"{old[0]} already exists{f' (and {len(old) - 1} more of its shards)' if len(old) > 1 else ''}"
                             "; pass --force to replace the output")
    disk = os.statvfs(parent)
    free = disk.f_bavail * disk.f_frsize
    if free < plan.total_bytes:  # the tensor data alone; metadata adds a little, which the write itself catches
        raise InputError(f"{parent} has {free / 1e6:.1f} MB free, the output needs at least {plan.total_bytes / 1e6:.1f} "
                         "MB; free some space or choose another output path")
    # a real write test: catches read-only mounts, permissions, /proc and the like with the file system's own reason
    probe = _make_partial_dir(out)
    shutil.rmtree(probe, ignore_errors=True)
    return files


def _make_partial_dir(out: Path) -> Path:
    """The hidden .<stem>.XXXXXXXX.partial/ beside the target; OS errors name the target, not the hidden dir."""
    parent = out.parent if str(out.parent) else Path(".")
    try:  # the stem is cut so a long (but legal) output name still leaves room for the temporary one
        return Path(tempfile.mkdtemp(prefix=f".{out.stem[:150]}.", suffix=PARTIAL_SUFFIX, dir=parent))
    except OSError as e:  # the cause is the directory (read-only, no permission, /proc), not the hidden name
        raise OSError(e.errno, e.strerror, str(parent)) from None


def _lock_partial_dir(tmpdir: Path) -> int:
    """Hold the writer lock of our partial dir; returns the fd (closing it releases the lock).
    The lock file is locked under a temporary name and then renamed, so no other run ever sees it unlocked."""
    tmp = tmpdir / (WRITER_LOCK + ".new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    os.rename(tmp, tmpdir / WRITER_LOCK)
    return fd


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete partial dirs of earlier runs on this target that died (SIGKILL, power loss): only directories named
    like ours, holding our lock file, whose lock nobody holds. Anything else is left alone."""
    parent = out.parent if str(out.parent) else Path(".")
    prefix = f".{out.stem[:150]}."
    removed = []
    with os.scandir(parent) as it:
        candidates = [parent / e.name for e in it if e.name.startswith(prefix) and e.name.endswith(PARTIAL_SUFFIX)
                      and e.is_dir(follow_symlinks=False)]
    for d in candidates:
        try:
            fd = os.open(d / WRITER_LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # no lock file: not ours (or not ours to judge)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live run is writing there
            os.close(fd)
            continue
        try:
            shutil.rmtree(d)
            removed.append(d)
        finally:
            os.close(fd)
    return removed


def _move_into_place(files: list[Path], dest: Path, force: bool) -> list[Path]:
    """Rename the finished files beside the target. Without --force a file that appeared meanwhile (another run)
    is not replaced: os.link fails on an existing name, atomically; where hard links are not supported, the
    existence check right before os.replace is the fallback."""
    final: list[Path] = []
    try:
        for f in files:
            target = dest / f.name
            if force:
                os.replace(f, target)
            else:
                try:
                    os.link(f, target)
                except FileExistsError:
                    raise InputError(f"{target} appeared while converting (another run?); nothing was replaced, "
                                     "pass --force to replace it") from None
                except OSError:  # e.g. a file system without hard links
                    if os.path.lexists(target):
                        raise InputError(f"{target} appeared while converting (another run?); nothing was "
                                         "replaced, pass --force to replace it") from None
                    os.replace(f, target)
            final.append(target)
    except BaseException:
        if not force:  # undo the part of a shard set that went in: never leave a mixed set
            for t in final:
                t.unlink(missing_ok=True)
        raise
    return final


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
    """A JSON value as the GGUF type llama.cpp reads for the key (gguf_metadata: the type the family already wrote,
    else gguf-py's writer's type for it, else inferred); a key the family wrote is replaced in place."""
    if key == "general.architecture" and val != w.arch:  # llama.cpp picks the graph by it: never another one
        raise InputError(f"metadata key general.architecture is {w.arch!r} for this model, not {val!r}; leave it out")
    kv = w.kv_data[0]  # gguf-py keeps every key in the first shard's table
    tokens = kv.get("tokenizer.ggml.tokens")
    kv[key] = gguf_value(key, val, w.arch, kv.get(key), len(tokens.value) if tokens is not None else None)


def load_metadata_overrides(path: str | Path) -> dict[str, Any]:
    """--metadata override.json: {"general.name": "...", "general.license": "...", ...}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise InputError(f"metadata file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"metadata file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"metadata file {path} must hold a JSON object of GGUF keys")
    for key, val in data.items():  # everything that does not need the model; the rest when the header is built
        check_override(key, val)
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is a mistake, not "the last one wins"."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InputError(f"metadata key {k} is given twice; keep one")
        out[k] = v
    return out


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
    check_output(plan, opts)
    importance = dict(opts.importance or {})
    device = resolve_encode_device(opts.device) if any(t.qtype.native for t in plan.tensors) else "cpu"
    if opts.imatrix is not None:
        importance.update(load_imatrix(opts.imatrix))
    if importance:
        check_imatrix(importance, {t.source.name: t.source.shape for t in plan.tensors},
                       str(opts.imatrix or "from --calib"))

    out = plan.output
    cleaned = remove_stale_partials(out)  # every check passed: this run owns the target now
    tmpdir = _make_partial_dir(out)
    lock_fd = -1
    try:
        lock_fd = _lock_partial_dir(tmpdir)
        w = gguf.GGUFWriter(tmpdir / out.name, arch=plan.family.arch, split_max_size=opts.split_max_size)
        plan.family.add_metadata(w)
        _provenance(w, plan, opts)
        for key, val in opts.metadata.items():
            _add_typed(w, key, val)
        _add_tensor_infos(w, plan)
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
        files = sorted(f for f in tmpdir.iterdir() if f.name != WRITER_LOCK)
        if opts.packed:
            verify_packed(files, opts.packed)
        final = _move_into_place(files, out.parent if str(out.parent) else Path("."), opts.force)
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
    stale = [f for f in _existing_outputs(out) if f not in final] if opts.force else []
    for f in stale:
        f.unlink(missing_ok=True)
    return ConvertResult(final, plan, time.perf_counter() - t0, removed=[*cleaned, *stale])
