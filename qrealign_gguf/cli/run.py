"""`qrealign-gguf run`: a GGUF file in llama-completion of the patched llama.cpp (built on first use)."""
from __future__ import annotations

from pathlib import Path

import typer

from ..errors import InputError
from .common import err, run_guarded


def run(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="GGUF file (any type, including qrealign's custom QR4_KO)"),
) -> None:
    """Run a GGUF file in llama-completion of the patched llama.cpp (built on first use); arguments after
    `--` go to llama-completion, e.g. `qrealign-gguf run m.qrealign.gguf -- -p "Hello" -n 64`."""
    import subprocess

    from ..llamacpp import LlamaNotFound, find_llama

    def work() -> int:
        if not path.is_file():
            raise InputError(f"{path} does not exist")
        try:
            b = find_llama("patched", build=False)
        except LlamaNotFound:
            err.print("building the patched llama.cpp (first use; ~15 min on 2 cores, cached afterwards)")
            try:
                b = find_llama("patched")
            except LlamaNotFound as e:
                raise InputError(str(e).splitlines()[0] + " (see tools/build/build_llama.sh patched)") from None
        cmd = [str(b.bin("llama-completion")), "-m", str(path), *ctx.args]
        return subprocess.run(cmd, env=b.env()).returncode

    rc = run_guarded(work)
    raise typer.Exit(rc or 0)
