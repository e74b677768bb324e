"""`qrealign-gguf` command line: a thin typer/rich shell over convert.py and inspect.py."""
from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import sys
from collections.abc import Iterator
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
# what was measured about each custom type, shown when a file gets one (docs/BENCHMARKS.md)
CUSTOM_STATUS = {
    "QR4_KO": "experimental: measured no better than Q4_K_M per bit and slower on CPU (docs/BENCHMARKS.md, round 8).",
    "QR5_K128": "Q5_K on 128-weight blocks, where llama.cpp falls back to Q5_0 / Q5_1; on Qwen2.5-0.5B QR4_K_M has "
                "29 % less KLD than Q4_K_M at +1.3 % size, same decode speed, 0.57x prompt speed on CPU "
                "(docs/BENCHMARKS.md, QR5_K128).",
}
out = Console(soft_wrap=True)


def _fail(msg: str, code: int = 2) -> None:
    from rich.markup import escape  # messages quote names from the user's files, e.g. a tensor "x[/]"

    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _run(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - generic guard
    """One line on any failure; SIGTERM behaves like Ctrl-C so temp files get cleaned up."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; no output file was written", 130)
    except OSError as e:
        # the machine, not the tool: a full disk, a read-only mount, a path that cannot exist. One line naming the
        # path and the cause; anything without a path or a known cause is still treated as a bug below
        if (e.filename is not None or e.errno in OS_HINTS) and not os.environ.get("QREALIGN_DEBUG"):
            _fail(_os_error_line(e))
        _internal_error(e)
    except Exception as e:  # noqa: BLE001 - a bug, but still no traceback unless asked for
        _internal_error(e)


def _internal_error(e: Exception) -> None:
    if os.environ.get("QREALIGN_DEBUG"):
        raise e
    _fail(f"internal error: {type(e).__name__}: {e} (set QREALIGN_DEBUG=1 for a traceback and report it)", 1)


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


def _os_error_line(e: OSError) -> str:
    cause = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    code = errno.errorcode.get(e.errno or 0)
    where = f"{e.filename}: " if e.filename is not None else ""
    hint = OS_HINTS.get(e.errno or 0)
    return f"{where}{cause}{f' ({code})' if code else ''}{f'; {hint}' if hint else ''}"


def _size(text: str) -> int:
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


def _check_side_output(path: Path, option: str, force: bool, clash: Path | None = None,
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
def _written_whole(path: Path | None, force: bool) -> Iterator[Path | None]:
    """Yields a hidden temporary name beside `path` for the writer to fill; renamed onto `path` only when the block
    succeeds, removed otherwise, so a failed write (full disk, Ctrl-C) never leaves half a file under `path`."""
    if path is None:
        yield None
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        if not force and os.path.lexists(path):
            raise InputError(f"{path} appeared meanwhile (another run?); nothing was replaced, pass --force to replace it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_numbers(**checks: tuple[float | int | None, str]) -> None:
    """Each option name -> (value, rule), rule one of: '>0', '>=0', 'finite', '0..1'. None (not given) passes.
    Checked before anything is loaded: a typo must not cost a model load, nor reach the output as NaN."""
    for name, (value, rule) in checks.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{name} {value} is not a finite number")
        bad = {">0": value <= 0, ">=0": value < 0, "finite": False, "0..1": not 0 <= value <= 1}[rule]
        if bad:
            want = {">0": "greater than 0", ">=0": "0 or more", "0..1": "between 0 and 1"}[rule]
            raise InputError(f"{name} {value} is out of range: it must be {want}")


@app.command()
def convert(
    model: Path = typer.Argument(..., help="Hugging Face model directory (config.json + *.safetensors)"),
    output: Path = typer.Option(Path("."), "-o", "--output", help="output .gguf file, or a directory for <Name>-<Size>-<TYPE>.gguf"),
    outtype: str = typer.Option("Q8_0", "--outtype", help="F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K(_S/_M/_L) Q4_K(_S/_M) Q5_K(_S/_M) Q6_K; qrealign's own (patched llama.cpp only, see `qrealign-gguf run`): QR4_K_M / QR5_K_M (Q4_K_M / Q5_K_M with the custom QR5_K128 where rows are a multiple of 128 but not 256) or QR4_KO (experimental Q4_K + outliers)"),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="llama.cpp imatrix GGUF for importance-aware rounding"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="prompts (.jsonl with 'prompt' or .txt) to compute the importance matrix"),
    calib_samples: int = typer.Option(128, "--calib-samples", help="prompts used from --calib"),
    save_imatrix: Optional[Path] = typer.Option(None, "--save-imatrix", help="also write the --calib importance as llama.cpp imatrix GGUF (an existing file needs --force)"),
    pure: bool = typer.Option(False, "--pure", help="every matrix in the base type, no per-tensor mix (llama-quantize --pure)"),
    split_max_size: str = typer.Option("0", "--split-max-size", help="max bytes per shard, e.g. 2G (0 = one file); shards are named <stem>-00001-of-0000N.gguf"),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="JSON object of GGUF keys to set or override"),
    threads: int = typer.Option(0, "--threads", "-t", help="encoder threads, and realignment's torch threads (0 = all cores; lower it on a shared machine)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (tensors, types, size) and write nothing"),
    force: bool = typer.Option(False, "--force", "-f", help="replace an existing output: the file or shards of this target (an earlier run's single file or shard set of another count is removed, so no stale set is left beside the new one), and an existing --save-imatrix file"),
    aligned: Optional[Path] = typer.Option(None, "--aligned", help="REALIGN: the aligned model this one was fine-tuned from (probes are fit on it)"),
    probes: Optional[Path] = typer.Option(None, "--probes", help="REALIGN: probes from `qrealign-gguf probe` instead of --aligned"),
    harmful: str = typer.Option("builtin:harmful", "--harmful", help="REALIGN: harmful calibration prompts (.jsonl)"),
    benign: str = typer.Option("builtin:benign", "--benign", help="REALIGN: benign calibration prompts (.jsonl)"),
    samples: int = typer.Option(32, "--realign-samples", help="REALIGN: prompts of each kind used for calibration"),
    iters: int = typer.Option(40, "--realign-iters", help="REALIGN: optimizer steps per layer"),
    lr: float = typer.Option(5e-3, "--realign-lr", help="REALIGN: Adam step for the rounding offsets, in code units (scale multipliers get a tenth); the offsets can move about iters*lr/2 in all"),
    harm_weight: float = typer.Option(0.01, "--harm-weight", help="REALIGN: weight of the probe term against the relative benign reconstruction error (the probe loss is ~1000x larger; 0.01 lets the benign term steer, docs/BENCHMARKS.md round 6)"),
    margin: Optional[float] = typer.Option(None, "--margin", help="REALIGN: base probe logit for harmful last-token states, the same in every layer; the target they must exceed is --margin plus --margin-offset (1.5 unless given: --margin 2 aims at 3.5; add --margin-offset 0 for exactly 2), and the default --benign-ceiling becomes minus --margin (no offset). Default: per layer, the aligned model's median harmful score"),
    margin_offset: float = typer.Option(1.5, "--margin-offset", help="REALIGN: added to every layer's harmful target score, whether from --margin or the aligned median (push harmful prompts past it; 0 = the paper's target)"),
    probe_layers: Optional[str] = typer.Option(None, "--probe-layers", help="REALIGN: layers that get the probe term, 0-based as in blk.N, e.g. 3- or 0,4-9 (default: every reliable layer; the others are only reconstructed)"),
    last_weight: float = typer.Option(1.0, "--benign-last-weight", help="REALIGN: extra weight of the benign prompts' last-token reconstruction (keeps safe prompts off the refusal side)"),
    benign_ceiling: Optional[float] = typer.Option(None, "--benign-ceiling", help="REALIGN: probe score benign prompts must stay below (default: per layer, the aligned model's median benign score; 0 = the decision boundary)"),
    probe_kind: str = typer.Option("content", "--probe-kind", help="REALIGN with --aligned: content (the paper's probes: aligned model, harmful vs benign prompts) or contrast (aligned vs this fine-tuned model on harmful prompts: the refusal the fine-tune removed)"),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="REALIGN: per-layer checkpoint dir (default <output>.realign-ckpt)"),
    equalize: bool = typer.Option(False, "--equalize", help="REALIGN: first fold exact per-channel scalings (norm->q/k/v, v->o, norm->gate/up, up->down; llama/qwen2) chosen on the benign prompts"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda: block encoders (and realignment's torch work); auto = CUDA when a GPU and the CUDA codec are available"),
) -> None:
    """Convert a Hugging Face model to GGUF; with --aligned or --probes, realign safety while quantizing."""
    from .convert import ConvertOptions, check_output, load_metadata_overrides, make_plan
    from .convert import convert as do_convert

    def work() -> None:
        _check_numbers(**{"--threads": (threads, ">=0"), "--calib-samples": (calib_samples, ">0"),
                          "--realign-samples": (samples, ">0"), "--realign-iters": (iters, ">=0"),
                          "--realign-lr": (lr, ">0"), "--harm-weight": (harm_weight, ">=0"),
                          "--margin": (margin, "finite"), "--margin-offset": (margin_offset, "finite"),
                          "--benign-last-weight": (last_weight, ">=0"),
                          "--benign-ceiling": (benign_ceiling, "finite")})
        opts = ConvertOptions(outtype=outtype, imatrix=imatrix, pure=pure, split_max_size=_size(split_max_size),
                              metadata=load_metadata_overrides(metadata) if metadata else {}, threads=threads,
                              force=force, device=device)
        plan = make_plan(model, output, opts)
        if plan.custom_types:
            _warn_custom(plan.custom_types, plan.output)
        if dry_run:
            _print_plan(plan)
            return
        check_output(plan, opts)  # here too, not only in convert(): before calibration or realignment runs for hours
        if save_imatrix is not None:
            if calib is None:
                raise InputError("--save-imatrix writes the importance computed from --calib; give --calib too")
            _check_side_output(save_imatrix, "--save-imatrix", force, clash=plan.output)
        realign = aligned is not None or probes is not None
        if realign:
            from .realign.pipeline import RealignRequest, prepare_realign, run_realign
            req = RealignRequest(model, aligned, probes, harmful, benign, samples, iters, harm_weight, margin,
                                 checkpoints, device, last_weight, benign_ceiling, probe_kind, equalize,
                                 margin_offset, probe_layers, lr)
            probe_set = prepare_realign(req, plan, console=err)  # every input checked before the long work
        if calib is not None:
            from .calib import compute_importance
            with _written_whole(save_imatrix, force) as imatrix_tmp:
                opts.importance = compute_importance(plan.family, calib, calib_samples, imatrix_tmp, console=err)
            opts.extra_provenance["imatrix"] = f"computed from {calib.name} ({calib_samples} prompts)"
        if realign:
            opts.packed = run_realign(req, plan, probe_set, opts, console=err)
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("starting", total=plan.total_bytes)

            def tick(name: str, i: int, n: int, done: int, total: int) -> None:
                bar.update(task, completed=done, description=f"[{i}/{n}] {name}")

            res = do_convert(model, output, opts, progress=tick, plan=plan)
        for f in res.removed:
            err.print(f"removed {f} (left by an earlier run on this target)", highlight=False, soft_wrap=True)
        if realign and checkpoints is None:  # written and verified: the per-layer checkpoints served their purpose
            import shutil
            from .realign.pipeline import default_checkpoint_dir
            shutil.rmtree(default_checkpoint_dir(plan), ignore_errors=True)
        for f in res.files:
            out.print(f"wrote {f} ({f.stat().st_size / 1e6:.1f} MB, {res.plan.bits_per_weight:.2f} bpw, {res.seconds:.1f} s)")

    _run(work)


@app.command()
def probe(
    model: Path = typer.Argument(..., help="the ALIGNED Hugging Face model (the one that still refuses)"),
    output: Path = typer.Option(..., "-o", "--output", help="probes file (.safetensors)"),
    harmful: str = typer.Option("builtin:harmful", "--harmful", help="harmful prompts (.jsonl, label 1)"),
    benign: str = typer.Option("builtin:benign", "--benign", help="benign prompts (.jsonl, label 0)"),
    samples: int = typer.Option(256, "--samples", help="prompts of each kind"),
    min_acc: float = typer.Option(0.9, "--min-acc", help="held-out accuracy a layer's probe needs to be used"),
    contrast: Optional[Path] = typer.Option(None, "--contrast", help="the FINE-TUNED model: fit refusal-state probes (aligned vs fine-tuned states on harmful prompts) instead of content probes"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of probe accuracy per layer"),
    force: bool = typer.Option(False, "--force", "-f", help="replace an existing output file and --plot file"),
) -> None:
    """Fit per-layer linear safety probes on the aligned model's last-token states."""
    from .realign.probes import probe_model

    def work() -> None:
        _check_numbers(**{"--samples": (samples, ">0"), "--min-acc": (min_acc, "0..1")})
        _check_side_output(output, "-o", force)
        if plot is not None:
            _check_side_output(plot, "--plot", force, clash=output)
        ps = probe_model(model, harmful, benign, samples, min_acc, console=err, contrast=contrast)
        with _written_whole(output, force) as tmp:
            ps.save(tmp)
        t = Table(title=f"probe accuracy per layer ({len(ps.reliable)}/{ps.n_layers} reliable at >= {min_acc:.2f})")
        for col in ("layer", "train", "held-out", "used"):
            t.add_column(col, justify="right")
        for i in range(ps.n_layers):
            t.add_row(str(i), f"{ps.train_acc[i]:.3f}", f"{ps.heldout_acc[i]:.3f}", "yes" if i in ps.reliable else "")
        out.print(t)
        if plot is not None:
            from .evaluate.report import plot_probe_accuracy
            plot_probe_accuracy(ps.heldout_acc.tolist(), plot, extra={"train": ps.train_acc.tolist()})
        out.print(f"wrote {output}")

    _run(work)


def _warn_custom(types: list[str], output: Path) -> None:
    """Loud, on stderr: a file with our custom tensor types does not load in stock llama.cpp."""
    from rich.panel import Panel

    from .formats.types import qtype

    names = ", ".join(f"{n} (id {qtype(n).id})" for n in types)
    status = "".join(f"\n{n}: {CUSTOM_STATUS[n]}" for n in types if n in CUSTOM_STATUS)
    err.print(Panel(
        f"[bold]{names}[/]: qrealign-gguf custom tensor type. [bold]Stock llama.cpp (and every app built on it) "
        f"cannot load this file[/]: it stops with \"invalid ggml type\".\n"
        f"Run it with the patched llama.cpp (native/llama_patches, built on first use):\n"
        f"  qrealign-gguf run {output} -- -p \"Hello\" -n 64\n"
        f"or build it yourself: bash tools/build_llama.sh patched{status}",
        title="[bold yellow]warning: custom tensor type",
        border_style="yellow"), highlight=False)


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
        if s.custom_types:
            from .llama_runtime import custom_type_note
            err.print(f"[bold yellow]note:[/] {custom_type_note(path)}", highlight=False, soft_wrap=True)

    _run(work)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="GGUF file (any type, including qrealign's custom QR4_KO)"),
) -> None:
    """Run a GGUF file in llama-completion of the patched llama.cpp (built on first use); arguments after
    `--` go to llama-completion, e.g. `qrealign-gguf run m.qrealign.gguf -- -p "Hello" -n 64`."""
    import subprocess

    from .llama_runtime import LlamaNotFound, find_llama

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
                raise InputError(str(e).splitlines()[0] + " (see tools/build_llama.sh patched)") from None
        cmd = [str(b.bin("llama-completion")), "-m", str(path), *ctx.args]
        return subprocess.run(cmd, env=b.env()).returncode

    rc = _run(work)
    raise typer.Exit(rc or 0)


@app.command()
def package(
    path: Path = typer.Argument(..., help="GGUF file to bundle"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="bundle .tar (default: <file>.bundle.tar next to it) or a directory"),
    eval_report: Optional[Path] = typer.Option(None, "--eval", help="`qrealign-gguf eval --json` report that measured this file"),
    force: bool = typer.Option(False, "--force", help="replace an existing bundle .tar"),
) -> None:
    """Bundle a GGUF for an edge device: the file (every shard of a split model), provenance.json, a model card,
    SHA256SUMS (and, for custom tensor types, the llama.cpp patches with build instructions for the device)."""
    from .package import package as build_bundle

    def work() -> None:
        bundle = build_bundle(path, output, eval_report, force=force)
        out.print(f"wrote {bundle} ({bundle.stat().st_size / 1e6:.1f} MB)")

    _run(work)


from .evaluate.cli import eval_command; app.command("eval")(eval_command)  # noqa: E402, E702


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
