"""`qrealign-gguf` command line: a thin typer/rich shell over convert.py and inspect.py."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert fine-tuned Hugging Face models to GGUF, realigning safety while quantizing.")
err = Console(stderr=True)
out = Console(soft_wrap=True)


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - generic guard
    """One line on any failure; SIGTERM behaves like Ctrl-C so temp files get cleaned up."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; no output file was written", 130)
    except Exception as e:  # noqa: BLE001 - a bug, but still no traceback unless asked for
        if os.environ.get("QREALIGN_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (set QREALIGN_DEBUG=1 for a traceback and report it)", 1)


def _size(text: str) -> int:
    """'2G', '500M', '1.5G', or plain bytes (llama.cpp's --split-max-size style)."""
    units = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
    t = text.strip().upper()
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise InputError(f"--split-max-size {text!r} is not a size; use e.g. 2G or 500M") from None


@app.command()
def convert(
    model: Path = typer.Argument(..., help="Hugging Face model directory (config.json + *.safetensors)"),
    output: Path = typer.Option(Path("."), "-o", "--output", help="output .gguf file, or a directory for <Name>-<Size>-<TYPE>.gguf"),
    outtype: str = typer.Option("Q8_0", "--outtype", help="F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K(_S/_M/_L) Q4_K(_S/_M) Q5_K(_S/_M) Q6_K"),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="llama.cpp imatrix GGUF for importance-aware rounding"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="prompts (.jsonl with 'prompt' or .txt) to compute the importance matrix"),
    calib_samples: int = typer.Option(128, "--calib-samples", help="prompts used from --calib"),
    save_imatrix: Optional[Path] = typer.Option(None, "--save-imatrix", help="also write the --calib importance as llama.cpp imatrix GGUF"),
    pure: bool = typer.Option(False, "--pure", help="every matrix in the base type, no per-tensor mix (llama-quantize --pure)"),
    split_max_size: str = typer.Option("0", "--split-max-size", help="max bytes per shard, e.g. 2G (0 = one file)"),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="JSON object of GGUF keys to set or override"),
    threads: int = typer.Option(0, "--threads", "-t", help="encoder threads (0 = all cores)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (tensors, types, size) and write nothing"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing output file"),
) -> None:
    """Convert a Hugging Face model to GGUF (plain conversion; realignment options arrive with --aligned)."""
    from .convert import ConvertOptions, load_metadata_overrides, make_plan
    from .convert import convert as do_convert

    def work() -> None:
        opts = ConvertOptions(outtype=outtype, imatrix=imatrix, pure=pure, split_max_size=_size(split_max_size),
                              metadata=load_metadata_overrides(metadata) if metadata else {}, threads=threads,
                              force=force)
        plan = make_plan(model, output, opts)
        if dry_run:
            _print_plan(plan)
            return
        if calib is not None:
            from .calib import compute_importance
            opts.importance = compute_importance(plan.family, calib, calib_samples, save_imatrix, console=err)
            opts.extra_provenance["imatrix"] = f"computed from {calib.name} ({calib_samples} prompts)"
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("starting", total=plan.total_bytes)

            def tick(name: str, i: int, n: int, done: int, total: int) -> None:
                bar.update(task, completed=done, description=f"[{i}/{n}] {name}")

            res = do_convert(model, output, opts, progress=tick, plan=plan)
        for f in res.files:
            out.print(f"wrote {f} ({f.stat().st_size / 1e6:.1f} MB, {res.plan.bits_per_weight:.2f} bpw, {res.seconds:.1f} s)")

    _run(work)


def _print_plan(plan) -> None:  # noqa: ANN001 - convert.Plan
    t = Table(title=f"{plan.family.arch} -> {plan.output.name} ({plan.outtype})")
    for col in ("tensor", "shape", "type", "bytes"):
        t.add_column(col, justify="right" if col == "bytes" else "left")
    for p in plan.tensors:
        t.add_row(p.source.name, "x".join(map(str, p.source.shape)), p.qtype.name, f"{p.nbytes:,}")
    out.print(t)
    counts: dict[str, int] = {}
    for p in plan.tensors:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    out.print(f"{len(plan.tensors)} tensors ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}), "
              f"{plan.total_bytes / 1e6:.1f} MB of tensor data, {plan.bits_per_weight:.2f} bits per weight")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="GGUF file"),
    all_keys: bool = typer.Option(False, "--all", help="print long arrays (vocabulary, merges) in full"),
) -> None:
    """Show a GGUF file's metadata, tensor table and bits per weight."""
    from .inspect import read_gguf_summary

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

    _run(work)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
