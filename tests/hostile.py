"""The harness of the hostile-input suite (tests/test_hostile_*.py): run the real CLI in a child process under a
memory cap and a time limit, then check the one promise every broken input is owed:

    exit code 2, one line on stderr, no traceback, and no file created, changed or removed in the watched folders.

A child process (not typer's CliRunner) because the promise covers what a user sees: the console script's exit
code, the process's memory (`ulimit -v`, so a length field that asks for 2**60 bytes fails in the test instead of
swapping the machine) and wall time (a hang is a failure, not a slow test).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# generous: importing torch + transformers maps ~2-3 GiB of address space on its own
MEM_LIMIT_MB = 8192
TIME_LIMIT_S = 180


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"qrealign-gguf {' '.join(self.args)} -> {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def run_cli(args: list[str | Path], cwd: Path | None = None, mem_mb: int = MEM_LIMIT_MB,
            timeout: float = TIME_LIMIT_S, env: dict[str, str] | None = None, stdin: str | None = None) -> Run:
    """`python -m qrealign_gguf ARGS` with `ulimit -v mem_mb` and a wall-clock limit (a hang raises TimeoutExpired)."""
    argv = [str(a) for a in args]
    cmd = f"ulimit -v {mem_mb * 1024}; exec \"$0\" -m qrealign_gguf \"$@\""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    full_env.pop("QREALIGN_DEBUG", None)
    p = subprocess.run(["bash", "-c", cmd, sys.executable, *argv], cwd=cwd, env=full_env, capture_output=True,
                       text=True, timeout=timeout, input=stdin if stdin is not None else "")
    return Run(argv, p.returncode, p.stdout, p.stderr)


def snapshot(*dirs: Path) -> dict[str, str]:
    """Every file and folder under `dirs` -> a digest of its content (folders: "dir"); hidden entries included."""
    out: dict[str, str] = {}
    for d in dirs:
        if not d.exists():
            continue
        for p in sorted(d.rglob("*")):
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = "dir"
            elif p.is_file():
                h = hashlib.sha256()
                with p.open("rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                out[str(p)] = h.hexdigest()
    return out


def assert_refused(r: Run, before: dict[str, str], *dirs: Path, match: str | None = None, code: int = 2) -> str:
    """The promise above; returns the error line. `before` is snapshot(*dirs) taken before the run."""
    assert r.returncode == code, str(r)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, str(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"want exactly one line on stderr\n{r}"
    assert lines[0].startswith("error:"), str(r)
    if match is not None:
        assert match.lower() in lines[0].lower(), f"{match!r} not in the message\n{r}"
    after = snapshot(*dirs)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files created, changed or removed: {changed}\n{r}"
    return lines[0]
