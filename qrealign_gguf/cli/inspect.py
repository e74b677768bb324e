"""`qrealign-gguf inspect`: a GGUF file's metadata, tensor table and bits per weight."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import err, out, run_guarded


def inspect(
    path: Path = typer.Argument(..., help="GGUF file"),
    all_keys: bool = typer.Option(False, "--all", help="print long arrays (vocabulary, merges) in full"),
) -> None:
    """Show a GGUF file's metadata, tensor table and bits per weight."""
    from ..inspect import read_gguf_summary

    def work() -> None:
        s = read_gguf_summary(path)
        meta = Table(title=f"{path.name}: metadata ({len(s.metadata)} keys)", show_lines=False)
        meta.add_column("key")
        meta.add_column("value", overflow="fold")
        for k, v in s.metadata.items():
            meta.add_row(k, v if all_keys else (v if len(v) <= 120 else v[:117] + "..."))
        out.print(meta)
        tt = Table(title=f"tensors ({len(s.tensors)})")
        for col in ("name", "type", "shape", "bytes"):
            tt.add_column(col, justify="right" if col == "bytes" else "left")
        for row in s.tensors:
            tt.add_row(row.name, row.type_name, "x".join(map(str, row.shape)), f"{row.nbytes:,}")
        out.print(tt)
        out.print(f"{s.n_params:,} weights, {s.tensor_bytes:,} bytes of tensor data, {s.bits_per_weight:.3f} bits per weight; "
                  f"types: {', '.join(f'{k} x{v}' for k, v in s.type_counts.items())}")
        if s.custom_types:
            from ..llamacpp import custom_type_note
            err.print(f"[bold yellow]note:[/] {custom_type_note(path)}", highlight=False, soft_wrap=True)

    run_guarded(work)
