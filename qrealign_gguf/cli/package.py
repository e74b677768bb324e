"""`qrealign-gguf package`: one tar for an edge device (api.package_model)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import log, out, run_guarded


def package(
    path: Path = typer.Argument(..., help="GGUF file to bundle"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="bundle .tar (default: <file>.bundle.tar next to it) or a directory"),
    eval_report: Optional[Path] = typer.Option(None, "--eval", help="`qrealign-gguf eval --json` report that measured this file"),
    force: bool = typer.Option(False, "--force", help="replace an existing bundle .tar"),
    target: Optional[str] = typer.Option(None, "--target", help="also bundle llama.cpp built for this device and a "
                                         "run.sh: host or linux-aarch64 (static; the first build takes ~10 CPU-minutes)"),
) -> None:
    """Bundle a GGUF for an edge device: the file (every shard of a split model), provenance.json, a model card,
    SHA256SUMS (and, for custom tensor types, the llama.cpp patches with build instructions for the device).
    With --target, the device's llama.cpp and run.sh too: unpack, `sha256sum -c SHA256SUMS`, `./run.sh "Hi"`."""
    from ..api import package_model

    def work() -> None:
        bundle = package_model(path, output, eval_report=eval_report, force=force, target=target, log=log)
        out.print(f"wrote {bundle} ({bundle.stat().st_size / 1e6:.1f} MB)")

    run_guarded(work)
