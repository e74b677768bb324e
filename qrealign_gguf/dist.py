"""Data parallelism over the calibration prompts on torch.distributed, as started by torchrun:

    torchrun --nproc-per-node N -m qrealign_gguf convert MODEL -o OUT.gguf --aligned ALIGNED ...

Every rank holds a shard of the prompts (global prompt i belongs to rank i % N) and computes its part; what the
math needs whole (gradients, losses, statistics) is summed over the ranks; rank 0 alone writes. Gloo on CPU, NCCL
for CUDA tensors (CPU tensors then still go through gloo). A `World` says who this process is and is passed
explicitly: nothing here keeps state (torch.distributed holds the one process group it creates). A single process
(no torchrun, or torchrun with one process) is `single()`, and every helper is then the identity without any
torch.distributed call, so the single-process code path is the plain one.

A collective that fails (a rank died: its sockets close at once; a rank hung: the group's timeout) raises
CollectiveError, an InputError: the CLI prints one line and exits 2 instead of hanging or dumping a traceback.

Helpers for the prompt-parallel passes:
  shard(world, items) / shard_indices(world, n)  this rank's prompts (i % size == rank), in global order
  local_part(world, global_indices)             of a global minibatch, the local positions this rank owns
  shard_total(world, local_count)               the global prompt count (and a check of the sharding)
  all_reduce_sum_(world, tensor)                in-place sum over ranks (gradients, imatrix sums, Gram matrices)
  sum_floats(world, values)                     sums of scalars, added in rank order: bit-identical everywhere
  all_gather_rows(world, rows)                  every rank's rows, in rank order (any row count per rank)
  unshard(world, rows, total)                   per-prompt rows (e.g. probe states) back in global prompt order
  gather_bytes / broadcast_bytes / broadcast_arrays  small payloads (fingerprints, checkpointed layers)
  check_same(world, fields)                     every rank started with the same arguments
  agree(world, check)                           a validation run everywhere; one rank's InputError stops all
  check_identical(world, what, digest)          results that must match on every rank (learned blocks) do
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# how long a rank waits in one collective for the others: covers the slowest rank's longest stretch of work between
# two collectives (rank 0 also checks outputs and saves checkpoints meanwhile), not the whole job
DEFAULT_TIMEOUT_S = 1800.0


class CollectiveError(InputError):
    """Talking to the other ranks failed (one died, hung or is unreachable); the message is one line."""


class EchoedError(InputError):
    """A failure rank 0 reports for the whole job, raised on the other ranks so they stop too; the CLI exits 2
    without printing it again (one line per job, not one per rank)."""


@dataclass(frozen=True)
class World:
    """Who this process is in the job. size 1: a plain single process (no process group)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that checks and writes outputs, checkpoints and side files, and reports progress."""
        return self.rank == 0

    @property
    def tag(self) -> str:
        return f"rank {self.rank}/{self.size}"


def single() -> World:
    return World()


# -- joining and leaving --------------------------------------------------------------------------------------------
def launcher_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, size, local_rank) when started by torchrun (or any launcher setting its env:// variables), else None."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise InputError(f"RANK={env['RANK']!r} WORLD_SIZE={env['WORLD_SIZE']!r}: not the integers torchrun sets; "
                         "start the job with torchrun") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise InputError(f"RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local} are inconsistent; start the job with torchrun")
    return rank, size, local


def init_world(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the job torchrun started (env:// rendezvous, the given timeout for every collective), or single() when
    there is none. device "cuda": NCCL for CUDA tensors on GPU LOCAL_RANK, gloo for CPU tensors; else gloo."""
    env = launcher_env()
    if env is None or env[1] == 1:
        return World(timeout_s=timeout_s)
    if not timeout_s > 0:
        raise InputError(f"distributed timeout {timeout_s} s: give a positive number of seconds")
    import torch
    import torch.distributed as tdist

    rank, size, local = env
    world = World(rank, size, local, timeout_s)
    if not tdist.is_available():
        raise InputError("this torch build has no torch.distributed; run without torchrun")
    if tdist.is_initialized():  # an API caller's own group: use it, as long as it is this job
        if (tdist.get_rank(), tdist.get_world_size()) != (rank, size):
            raise InputError(f"a process group of rank {tdist.get_rank()}/{tdist.get_world_size()} is already "
                             f"initialized, but the launcher says {world.tag}")
        return world
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
        # a timed-out NCCL collective then raises in the waiting thread (one line) instead of aborting the process
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    try:
        tdist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=size,
                                 timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
        raise CollectiveError(_failure_line(world, "joining the other ranks", e)) from None
    return world


def shutdown(world: World) -> None:
    """Leave the process group. Also after a failed collective: without it, a gloo group with a timed-out
    operation aborts the interpreter at exit ("terminate called without an active exception")."""
    if world.size == 1:
        return
    import torch.distributed as tdist

    if tdist.is_initialized():
        with contextlib.suppress(Exception):  # leaving cannot change the result; the job's own error matters
            tdist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[World]:
    """init_world ... shutdown, also on errors. A group that existed before is left as it was."""
    import torch.distributed as tdist

    owned = launcher_env() is not None and not (tdist.is_available() and tdist.is_initialized())
    world = init_world(device, timeout_s)
    try:
        yield world
    finally:
        if owned:
            shutdown(world)


def write_launcher_error(line: str, environ: Mapping[str, str] | None = None) -> None:
    """Give torchrun this rank's one-line error: its failure summary shows it instead of "To enable traceback
    see ..." (TORCHELASTIC_ERROR_FILE, the file torchrun's own @record would write)."""
    env = os.environ if environ is None else environ
    path = env.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)


# -- failures -------------------------------------------------------------------------------------------------------
def _failure_line(world: World, what: str, e: BaseException) -> str:
    """One line for a failed collective: who, while doing what, the likely cause, what to do."""
    raw = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cause = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", raw)  # gloo's "[.../pair.cc:553] " source prefix
    cause = cause.split(". This is typically")[0]  # ... and its advice to read the other ranks' logs
    if "timed out" in raw.lower() or "timeout" in raw.lower():
        why = f"no answer from the other ranks within {world.timeout_s:g} s (a rank hung or its node is unreachable)"
    else:
        why = "lost the other ranks (one of them failed, was killed or its node is unreachable)"
    return (f"{world.tag}: {why} while {what} ({cause}); the job stops: fix the failing rank (its own output says "
            "why) and rerun the same command, a realignment continues from its checkpoints")


def _collective(world: World, what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as e:  # gloo / NCCL / store errors (torch.distributed.DistError is a RuntimeError)
        raise CollectiveError(_failure_line(world, what, e)) from None


# -- sharding -------------------------------------------------------------------------------------------------------
def shard_indices(world: World, n: int) -> range:
    """The global indices of this rank's items among n: i % size == rank (deterministic, balanced to one item)."""
    return range(world.rank, n, world.size)


def shard(world: World, items: Sequence[T]) -> list[T]:
    """This rank's items, in global order; the whole list in a single process."""
    return list(items) if world.size == 1 else [items[i] for i in shard_indices(world, len(items))]


def local_part(world: World, global_indices: Sequence[int]) -> list[int]:
    """Of a global minibatch (indices into all n items, drawn identically on every rank), the positions in this
    rank's shard of the ones it owns, in the minibatch's order; the minibatch itself in a single process."""
    if world.size == 1:
        return list(global_indices)
    return [g // world.size for g in global_indices if g % world.size == world.rank]


def shard_total(world: World, local_count: int) -> int:
    """The global item count from each rank's shard size; raises if the shards are not shard_indices' (a caller
    that sharded differently would silently weight prompts wrongly)."""
    if world.size == 1:
        return local_count
    counts = [int(c) for c in all_gather_rows(world, _as_tensor([local_count], "int64"), what="counting prompts")]
    total = sum(counts)
    want = [len(range(r, total, world.size)) for r in range(world.size)]
    if counts != want:
        raise AssertionError(f"prompt shards {counts} are not the i % {world.size} split of {total} ({want})")
    return total


# -- collectives ----------------------------------------------------------------------------------------------------
def _as_tensor(values: Sequence[float] | Sequence[int], dtype: str) -> torch.Tensor:
    import torch

    return torch.tensor(list(values), dtype=getattr(torch, dtype))


def all_reduce_sum_(world: World, t: torch.Tensor, what: str = "summing over the ranks") -> torch.Tensor:
    """Sum `t` over the ranks, in place (on its device: CUDA tensors through NCCL, CPU ones through gloo); returns
    it. Every rank gets the same bits (ring all-reduce), and the same world size gives the same bits run after run
    on a given backend; use sum_floats where the order of the additions must be fixed by rank."""
    if world.size == 1:
        return t
    import torch.distributed as tdist

    _collective(world, what, lambda: tdist.all_reduce(t, op=tdist.ReduceOp.SUM))
    return t


def sum_floats(world: World, values: Sequence[float], what: str = "summing statistics") -> list[float]:
    """Per position, the sum over the ranks of `values` (same length everywhere), in float64, added in rank order:
    exactly the same numbers on every rank and in every run (losses that decide the kept iterate, statistics)."""
    if world.size == 1:
        return [float(v) for v in values]
    rows = all_gather_rows(world, _as_tensor([float(v) for v in values], "float64")[None, :], what=what)
    out = [0.0] * len(values)
    for r in rows:  # rank order
        for j, v in enumerate(r[0].tolist()):
            out[j] += v
    return out


def all_gather_rows(world: World, rows: torch.Tensor, what: str = "gathering rows") -> list[torch.Tensor]:
    """Every rank's `rows` (same trailing shape and dtype everywhere, any count of rows), in rank order, on the
    CPU. Single process: [rows]."""
    if world.size == 1:
        return [rows]
    import torch
    import torch.distributed as tdist

    rows = rows.detach().cpu().contiguous()
    n = torch.tensor([rows.shape[0]], dtype=torch.int64)
    counts = [torch.zeros_like(n) for _ in range(world.size)]
    _collective(world, what, lambda: tdist.all_gather(counts, n))
    top = max(int(c) for c in counts)
    padded = rows.new_zeros((top, *rows.shape[1:]))  # all_gather needs one shape on every rank
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    _collective(world, what, lambda: tdist.all_gather(parts, padded))
    return [p[: int(c)] for p, c in zip(parts, counts)]


def unshard(world: World, rows: torch.Tensor, total: int, what: str = "gathering per-prompt rows") -> torch.Tensor:
    """Per-prompt rows computed on this rank's shard (row j = global prompt shard_indices[j]) -> all `total` rows
    in global prompt order, on every rank (probe states: the fit then sees exactly the single-process matrix)."""
    if world.size == 1:
        return rows
    import torch

    parts = all_gather_rows(world, rows, what)
    out = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype)
    for r, part in enumerate(parts):
        idx = shard_indices(World(r, world.size), total)
        if part.shape[0] != len(idx):
            raise AssertionError(f"rank {r} sent {part.shape[0]} rows, its shard of {total} has {len(idx)}")
        out[list(idx)] = part
    return out


def gather_bytes(world: World, data: bytes, what: str = "exchanging data") -> list[bytes]:
    """Every rank's `data`, in rank order."""
    if world.size == 1:
        return [data]
    import torch

    mine = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return [p.numpy().tobytes() for p in all_gather_rows(world, mine, what)]


def broadcast_bytes(world: World, data: bytes | None, src: int = 0, what: str = "receiving data") -> bytes:
    """`data` of rank `src` (the others pass None) on every rank."""
    if world.size == 1:
        return data or b""
    import torch
    import torch.distributed as tdist

    n = torch.tensor([len(data) if world.rank == src and data else 0], dtype=torch.int64)
    _collective(world, what, lambda: tdist.broadcast(n, src))
    buf = torch.zeros(int(n), dtype=torch.uint8)
    if world.rank == src and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if int(n):
        _collective(world, what, lambda: tdist.broadcast(buf, src))
    return buf.numpy().tobytes()


def broadcast_arrays(world: World, arrays: Mapping[str, np.ndarray] | None, src: int = 0,
                     what: str = "receiving a checkpointed layer") -> dict[str, np.ndarray]:
    """Named arrays of rank `src` on every rank (e.g. a layer resumed from rank 0's checkpoint: the other ranks, on
    other nodes perhaps, never read the checkpoint directory). .npz without pickles."""
    if world.size == 1:
        return dict(arrays or {})
    payload = None
    if world.rank == src:
        buf = io.BytesIO()
        np.savez(buf, **dict(arrays or {}))
        payload = buf.getvalue()
    with np.load(io.BytesIO(broadcast_bytes(world, payload, src, what)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def barrier(world: World, what: str = "waiting for the other ranks") -> None:
    if world.size == 1:
        return
    sum_floats(world, [0.0], what)  # a real collective, so a dead rank shows up here like anywhere else


# -- agreement ------------------------------------------------------------------------------------------------------
def _stop(world: World, line: str) -> InputError:
    """The error every rank raises for a job-wide failure: rank 0 reports it, the others stop quietly."""
    return InputError(line) if world.is_main else EchoedError(line)


def check_same(world: World, fields: Mapping[str, str]) -> None:
    """Every rank was started with the same arguments (field -> its value as text): a rank with another model,
    output type or setting would compute another job and the sums would mix the two. One line naming the first
    field that differs."""
    if world.size == 1:
        return
    mine = json.dumps(dict(fields), sort_keys=True).encode()
    everyone = [json.loads(b) for b in gather_bytes(world, mine, "comparing the ranks' arguments")]
    ref = everyone[0]
    for r, other in enumerate(everyone[1:], 1):
        for k in sorted(set(ref) | set(other)):
            if ref.get(k) != other.get(k):
                raise _stop(world, f"the ranks were started with different arguments: {k} is "
                                   f"{ref.get(k, '(not given)')} on rank 0 but {other.get(k, '(not given)')} on rank "
                                   f"{r}; start every rank with the same command")


def agree(world: World, check: Callable[[], T], what: str = "sharing the input checks") -> T:
    """Run `check` (validation that may raise InputError) on every rank, then share the outcome: when it failed
    anywhere, every rank stops with the lowest failing rank's message (prefixed with that rank unless it is 0) and
    no rank is left waiting for the others. Returns check's result. Single process: check()."""
    if world.size == 1:
        return check()
    result: T | None = None
    msg = ""
    try:
        result = check()
    except InputError as e:
        msg = str(e) or type(e).__name__
    for r, m in enumerate(gather_bytes(world, msg.encode(), what)):
        if m:
            text = m.decode(errors="replace")
            raise _stop(world, text if r == 0 else f"rank {r}/{world.size}: {text}")
    return result  # type: ignore[return-value]


def check_identical(world: World, what: str, digest: bytes) -> None:
    """Results every rank computed from the same summed numbers must be bit-identical (else the ranks would go on
    with different layers); a mismatch means a non-deterministic backend, i.e. a bug, not bad input."""
    if world.size == 1:
        return
    got = gather_bytes(world, digest, f"comparing {what}")
    bad = [r for r, d in enumerate(got) if d != got[0]]
    if bad:
        raise RuntimeError(f"{what} differs between rank 0 and rank(s) {bad}: the ranks diverged")
