"""What every command shares: the consoles, the one-line error mapping (exit 2 for bad input, 130 for Ctrl-C,
1 for a bug) and parsing of option text that is CLI-only (sizes like 2G)."""
from __future__ import annotations

import errno
import math
import os
import signal
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

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
    err.print(msg, highlight=False, soft_wrap=True)


def fail(msg: str, code: int = 2) -> NoReturn:
    from rich.markup import escape  # messages quote names from the user's files, e.g. a tensor "x[/]"

    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """One line on any failure; SIGTERM behaves like Ctrl-C so temp files get cleaned up."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; no output file was written", 130)
    except OSError as e:
        # the machine, not the tool: a full disk, a read-only mount, a path that cannot exist. One line naming the
        # path and the cause; anything without a path or a known cause is still treated as a bug below
        if (e.filename is not None or e.errno in OS_HINTS) and not os.environ.get("QREALIGN_DEBUG"):
            fail(_os_error_line(e))
        _internal_error(e)
    except Exception as e:  # noqa: BLE001 - a bug, but still no traceback unless asked for
        _internal_error(e)


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
