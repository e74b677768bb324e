"""How the library reports progress without knowing who listens: plain callbacks (the CLI prints them with rich;
API callers pass their own or nothing)."""
from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]  # one progress line, e.g. "blk.3 (4/24) [12s]: ..."


class LogLines:
    """A console-shaped adapter for the functions that print to a console (probes.probe_model,
    calib.compute_importance): each message goes to a plain Log callback."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def print(self, msg: object, **_: object) -> None:
        self.log(str(msg))


def as_console(log: Log | None) -> LogLines | None:
    return LogLines(log) if log is not None else None
