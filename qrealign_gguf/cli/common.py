"""What every command shares: the consoles, the one-line error mapping (exit 2 for bad input, 130 for Ctrl-C,
1 for a bug) and parsing of option text that is CLI-only (sizes like 2G).

Under torchrun (several processes, dist.py) only rank 0 prints progress and results; another rank prints only an
error of its own (prefixed with its rank). A failure rank 0 already reports (dist.EchoedError), or torchrun stopping
the workers because one failed (SIGTERM), ends the other ranks with exit 2 and no line of their own."""
from __future__ import annotations

import errno
import math
import os
import signal
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console

from .. import dist
from ..errors import InputError

err = Console(stderr=True)
out = Console(soft_wrap=True)
T = TypeVar("T")

# what to do about an OS error, by errno
OS_HINTS = {
    errno.ENOSPC: "free some space or choose another output path",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another output path",
    errno.EFBIG: "the file is larger than this file system or the process's file size limit (ulimit -f) allows; "
                 "use --split-max-size or another output path",
    errno.EROFS: "choose another output path",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; check the path",
    errno.EISDIR: "the path is a directory; give a file name",
    errno.ENOENT: "check the path",
    errno.EIO: "the device reported an I/O error; check the disk",
}


def log(msg: str) -> None:
    """The library's progress lines (api.*(log=...)), on stderr so stdout keeps the results."""
    err.print(msg, highlight=False, soft_wrap=True, markup=False)  # plain text: "[checkpoint]" is not a style tag


def fail(msg: str, code: int = 2) -> NoReturn:
    from rich.markup import escape  # messages quote names from the user's files, e.g. a tensor "x[/]"

    launched = _launched()
    if launched is not None and launched[0] != 0 and not msg.startswith("rank "):
        msg = f"rank {launched[0]}/{launched[1]}: {msg}"
    console = err if not err.quiet else Console(stderr=True)  # a quiet rank's own error is still its one line
    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    if launched is not None:  # torchrun's failure summary then shows this line instead of "To enable traceback"
        dist.write_launcher_error(f"error: {msg}")
    raise typer.Exit(code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM: kill, or torchrun stopping the other workers because one of them failed."""


def _terminate(*_: object) -> None:
    raise _Terminated


def _launched() -> tuple[int, int] | None:
    """(rank, size) when this process is one of several that torchrun started, else None."""
    try:
        env = dist.launcher_env()
    except InputError:  # malformed variables: the command's own dist.init_world says so
        return None
    return (env[0], env[1]) if env is not None and env[1] > 1 else None


def _join_launcher(launched: tuple[int, int]) -> None:
    """A torchrun worker: only `convert` and `probe` share their work out (the others would run N times, each
    writing); only rank 0 prints."""
    ctx = click.get_current_context(silent=True)
    command = ctx.info_name if ctx is not None else None
    if command not in (None, "convert", "probe"):
        if launched[0] == 0:
            fail(f"`{command}` does not run under torchrun (only `convert` and `probe` share their work out); "
                 "run it as one process")
        raise typer.Exit(2)
    if launched[0] != 0:
        out.quiet = err.quiet = True


def run_guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """One line on any failure; SIGTERM behaves like Ctrl-C so temp files get cleaned up."""
    launched = _launched()
    if launched is not None:
        _join_launcher(launched)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return fn(*args, **kwargs)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure becomes one line
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the job is ending: a late SIGTERM must not cut the line off
        try:
            _report(e, launched)
        finally:
            # a torchrun worker stays deaf to it until it has exited: torchrun sends SIGTERM to every worker as soon
            # as one fails, and a default handler restored here would turn this rank's exit 2 into "killed by SIGTERM"
            if launched is None:
                signal.signal(signal.SIGTERM, previous)


def _report(e: BaseException, launched: tuple[int, int] | None) -> NoReturn:
    if isinstance(e, dist.EchoedError):  # rank 0 prints it for the job
        raise typer.Exit(2)
    if isinstance(e, InputError):
        fail(str(e))
    if isinstance(e, _Terminated) and launched is not None:
        if launched[0] == 0:
            # torchrun stops the survivors as soon as one worker fails; a SIGKILLed worker prints nothing itself,
            # so point at torchrun's failure summary, which names it and its signal
            fail("stopped by torchrun: another rank failed (its own line, or torchrun's summary below, says which and "
                 "why) or the job was stopped; no output file was written, and a realignment continues from its "
                 "checkpoints when rerun")
        raise typer.Exit(2)
    if isinstance(e, KeyboardInterrupt):
        fail("interrupted; no output file was written", 130)
    if isinstance(e, OSError):
        # the machine, not the tool: a full disk, a read-only mount, a path that cannot exist. One line naming the
        # path and the cause; anything without a path or a known cause is still treated as a bug below
        if (e.filename is not None or e.errno in OS_HINTS) and not os.environ.get("QREALIGN_DEBUG"):
            fail(_os_error_line(e))
        _internal_error(e)
    _internal_error(e)  # type: ignore[arg-type] - a bug, but still no traceback unless asked for


def _internal_error(e: Exception) -> NoReturn:
    if os.environ.get("QREALIGN_DEBUG"):
        raise e
    fail(f"internal error: {type(e).__name__}: {e} (set QREALIGN_DEBUG=1 for a traceback and report it)", 1)


def _os_error_line(e: OSError) -> str:
    cause = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    code = errno.errorcode.get(e.errno or 0)
    where = f"{e.filename}: " if e.filename is not None else ""
    hint = OS_HINTS.get(e.errno or 0)
    return f"{where}{cause}{f' ({code})' if code else ''}{f'; {hint}' if hint else ''}"


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5G', or plain bytes (llama.cpp's --split-max-size style); 0 = one file."""
    units = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
    t = text.strip().upper()
    number, unit = (t[:-1], units[t[-1]]) if t and t[-1] in units else (t, 1)
    try:
        value = float(number) * unit
    except ValueError:
        raise InputError(f"--split-max-size {text!r} is not a size; use e.g. 2G or 500M (0 = one file)") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"--split-max-size {text!r} must be a positive size, e.g. 2G or 500M (0 = one file)")
    if 0 < value < 1:  # would round to 0 and silently mean "one file"
        raise InputError(f"--split-max-size {text!r} is less than one byte; use e.g. 2G or 500M (0 = one file)")
    return int(value)
