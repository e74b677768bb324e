"""Where a conversion's output goes: the planned file names, the checks before any long work, the hidden partial
directory (flock-ed by its writer) that the files are written into, and the final move into place. Also the
files an option writes beside the main output (--save-imatrix, --plot, --json, probe files)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from .errors import InputError
from .plan import Plan

PARTIAL_SUFFIX = ".partial"
# inside a partial directory: a file flock-ed by the process writing there, so a later run can tell a dead run's
# leftovers (lock free) from a live one (lock held); the kernel drops the lock when the writer dies, even by SIGKILL
WRITER_LOCK = ".qrealign-writer.lock"


def add_tensor_infos(w: gguf.GGUFWriter, plan: Plan) -> None:
    for t in plan.tensors:
        w.add_tensor_info(t.source.name, t.source.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype.ggml)


def output_files(plan: Plan, split_max_size: int) -> list[Path]:
    """The files convert will write: plan.output, or gguf-py's shards <stem>-00001-of-0000N.gguf beside it
    (the split is decided by the writer itself, from the same tensor sizes, so the names cannot drift)."""
    w = gguf.GGUFWriter(None, arch=plan.family.arch, split_max_size=split_max_size)
    add_tensor_infos(w, plan)
    return w.format_shard_names(plan.output)


def _is_shard_of(name: str, stem: str) -> bool:
    """<stem>-00001-of-00003.gguf: a shard written by gguf-py for the target <stem>.gguf."""
    return re.fullmatch(re.escape(stem) + r"-\d{5}-of-\d{5}\.gguf", name) is not None


def existing_outputs(out: Path) -> list[Path]:
    """Files of an earlier run on the same target: the single file and shard sets of any count."""
    parent = out.parent
    found = [out] if os.path.lexists(out) else []
    with os.scandir(parent) as it:
        found += sorted(parent / e.name for e in it if _is_shard_of(e.name, out.stem))
    return found


def check_output(plan: Plan, *, split_max_size: int = 0, force: bool = False) -> list[Path]:
    """Refuse, before any long work, an output that cannot be written or would replace files without --force.
    Returns the files that will be written."""
    out = plan.output
    if out.suffix != ".gguf":
        raise InputError(f"output {out} must end in .gguf (or be an existing directory)")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"output directory {parent} is not a directory (a file of that name exists); "
                         "choose another output path")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist; create it first")
    if split_max_size < 0:
        raise InputError(f"split size {split_max_size} is negative; give a positive size or 0 for one file")
    files = output_files(plan, split_max_size)
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except OSError:  # not every file system says; the write itself will tell
        name_max = 255
    for f in files:
        if len(os.fsencode(f.name)) > name_max:
            raise InputError(f"output file name {f.name} is longer than this file system allows ({name_max} bytes); "
                             "choose a shorter output name")
    if not force:
        old = existing_outputs(out)
        if old:
            raise InputError(f"{old[0]} already exists{f' (and {len(old) - 1} more of its shards)' if len(old) > 1 else ''}"
                             "; pass --force to replace the output")
    disk = os.statvfs(parent)
    free = disk.f_bavail * disk.f_frsize
    if free < plan.total_bytes:  # the tensor data alone; metadata adds a little, which the write itself catches
        raise InputError(f"{parent} has {free / 1e6:.1f} MB free, the output needs at least {plan.total_bytes / 1e6:.1f} "
                         "MB; free some space or choose another output path")
    # a real write test: catches read-only mounts, permissions, /proc and the like with the file system's own reason
    probe = make_partial_dir(out)
    shutil.rmtree(probe, ignore_errors=True)
    return files


def make_partial_dir(out: Path) -> Path:
    """The hidden .<stem>.XXXXXXXX.partial/ beside the target; OS errors name the target, not the hidden dir."""
    parent = out.parent
    try:  # the stem is cut so a long (but legal) output name still leaves room for the temporary one
        return Path(tempfile.mkdtemp(prefix=f".{out.stem[:150]}.", suffix=PARTIAL_SUFFIX, dir=parent))
    except OSError as e:  # the cause is the directory (read-only, no permission, /proc), not the hidden name
        raise OSError(e.errno, e.strerror, str(parent)) from None


def lock_partial_dir(tmpdir: Path) -> int:
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
    parent = out.parent
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


def move_into_place(files: list[Path], dest: Path, force: bool) -> list[Path]:
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


# -- side outputs: one file an option writes next to the main output ---------------------------------------------
def check_side_output(path: Path, option: str, force: bool, clash: Path | None = None,
                      make_parents: bool = False) -> None:
    """A file an option writes next to the main output (--save-imatrix, --plot, --json): checked before the work,
    never replaced without --force."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; give a file name")
    if clash is not None and path.resolve() == clash.resolve():
        raise InputError(f"{option} {path} is the main output file; give another name")
    if os.path.lexists(path) and not force:
        raise InputError(f"{option} {path} already exists; pass --force to replace it")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{option} {path}: {parent} is a file, not a directory; choose another path")
    if not make_parents and not parent.is_dir():
        raise InputError(f"{option} {path}: directory {parent} does not exist; create it first")


@contextlib.contextmanager
def written_whole(path: Path | None, force: bool) -> Iterator[Path | None]:
    """Yields a hidden temporary name beside `path` for the writer to fill; renamed onto `path` only when the block
    succeeds, removed otherwise, so a failed write (full disk, Ctrl-C) never leaves half a file under `path`."""
    if path is None:
        yield None
        return
    # the extension stays last: some writers (matplotlib) choose the format by it
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        if not force and os.path.lexists(path):
            raise InputError(f"{path} appeared meanwhile (another run?); nothing was replaced, pass --force to replace it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
