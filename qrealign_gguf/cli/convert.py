"""`qrealign-gguf convert`: options -> api.ConvertJob, then the plan table (--dry-run), the custom-type warning and a
progress bar around api.convert_model."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.panel import Panel
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..dist import DEFAULT_TIMEOUT_S
from ..errors import InputError
from ..realign.options import RealignOptions as R
from .common import err, log, out, parse_size, run_guarded

if TYPE_CHECKING:
    from ..api import RealignBudget
    from ..plan import Plan

# what was measured about each custom type, shown when a file gets one (docs/BENCHMARKS.md)
CUSTOM_STATUS = {
    "QR4_KO": "experimental: measured no better than Q4_K_M per bit and slower on CPU (docs/BENCHMARKS.md, round 8).",
    "QR5_K128": "Q5_K on 128-weight blocks, where llama.cpp falls back to Q5_0 / Q5_1; on Qwen2.5-0.5B QR4_K_M has "
                "29 % less KLD than Q4_K_M at +1.3 % size, same decode speed, 0.57x prompt speed on CPU "
                "(docs/BENCHMARKS.md, QR5_K128).",
}


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
    harmful: str = typer.Option(R.harmful, "--harmful", help="REALIGN: harmful calibration prompts (.jsonl)"),
    benign: str = typer.Option(R.benign, "--benign", help="REALIGN: benign calibration prompts (.jsonl)"),
    samples: int = typer.Option(R.samples, "--realign-samples", help="REALIGN: prompts of each kind used for calibration"),
    iters: int = typer.Option(R.iters, "--realign-iters", help="REALIGN: optimizer steps per layer"),
    lr: float = typer.Option(R.lr, "--realign-lr", help="REALIGN: Adam step for the rounding offsets, in code units (scale multipliers get a tenth); the offsets can move about iters*lr/2 in all"),
    harm_weight: float = typer.Option(R.harm_weight, "--harm-weight", help="REALIGN: weight of the probe term against the relative benign reconstruction error (the probe loss is ~1000x larger; 0.01 lets the benign term steer, docs/BENCHMARKS.md round 6)"),
    margin: Optional[float] = typer.Option(R.margin, "--margin", help="REALIGN: base probe logit for harmful last-token states, the same in every layer; the target they must exceed is --margin plus --margin-offset (1.5 unless given: --margin 2 aims at 3.5; add --margin-offset 0 for exactly 2), and the default --benign-ceiling becomes minus --margin (no offset). Default: per layer, the aligned model's median harmful score"),
    margin_offset: float = typer.Option(R.margin_offset, "--margin-offset", help="REALIGN: added to every layer's harmful target score, whether from --margin or the aligned median (push harmful prompts past it; 0 = the paper's target)"),
    probe_layers: Optional[str] = typer.Option(R.probe_layers, "--probe-layers", help="REALIGN: layers that get the probe term, 0-based as in blk.N, e.g. 3- or 0,4-9 (default: every reliable layer; the others are only reconstructed)"),
    last_weight: float = typer.Option(R.last_weight, "--benign-last-weight", help="REALIGN: extra weight of the benign prompts' last-token reconstruction (keeps safe prompts off the refusal side)"),
    benign_ceiling: Optional[float] = typer.Option(R.benign_ceiling, "--benign-ceiling", help="REALIGN: probe score benign prompts must stay below (default: per layer, the aligned model's median benign score; 0 = the decision boundary)"),
    probe_kind: str = typer.Option(R.probe_kind, "--probe-kind", help="REALIGN with --aligned: content (the paper's probes: aligned model, harmful vs benign prompts) or contrast (aligned vs this fine-tuned model on harmful prompts: the refusal the fine-tune removed)"),
    distill_weight: float = typer.Option(R.distill_weight, "--distill-weight", help="REALIGN with --aligned: weight of a second harmful term that pulls every token's state of the harmful prompts towards the aligned model's own (the same relative error the benign prompts have towards this model); 0 = off. Experimental: docs/BENCHMARKS.md round 13"),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="REALIGN: per-layer checkpoint dir (default <output>.realign-ckpt)"),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="REALIGN: keep the per-layer activations (and those of the probe fit) in files under this directory instead of memory, for large prompt sets; removed when done"),
    equalize: bool = typer.Option(R.equalize, "--equalize", help="REALIGN: first fold exact per-channel scalings (norm->q/k/v, v->o, norm->gate/up, up->down; llama/qwen2) chosen on the benign prompts"),
    dist_timeout: float = typer.Option(DEFAULT_TIMEOUT_S, "--dist-timeout", help="under torchrun: seconds a rank waits for the others in one exchange before the whole job stops with one line (resumable from checkpoints)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda: block encoders (and realignment's torch work); auto = CUDA when a GPU and the CUDA codec are available"),
) -> None:
    """Convert a Hugging Face model to GGUF; with --aligned or --probes, realign safety while quantizing."""
    from ..api import ConvertJob, convert_model, plan_conversion, realign_budget
    from ..convert import load_metadata_overrides
    from ..realign.reach import reach_caveat

    def work() -> None:
        realign = R(aligned=aligned, probes=probes, harmful=harmful, benign=benign, samples=samples, iters=iters,
                    lr=lr, harm_weight=harm_weight, margin=margin, margin_offset=margin_offset,
                    probe_layers=probe_layers, last_weight=last_weight, benign_ceiling=benign_ceiling,
                    probe_kind=probe_kind, equalize=equalize, checkpoints=checkpoints, offload_dir=offload_dir,
                    distill_weight=distill_weight)
        realign.check_numbers()  # given without --aligned/--probes they do nothing, but a typo is still a typo
        job = ConvertJob(model=model, output=output, outtype=outtype, imatrix=imatrix, calib=calib,
                         calib_samples=calib_samples, save_imatrix=save_imatrix, pure=pure,
                         split_max_size=parse_size(split_max_size),
                         metadata=load_metadata_overrides(metadata) if metadata else {}, threads=threads,
                         force=force, device=device, dist_timeout=dist_timeout,
                         realign=realign if aligned is not None or probes is not None else None)
        plan = plan_conversion(job)  # numbers before the model headers: a typo must not cost a model load
        if plan.custom_types:
            _warn_custom(plan.custom_types, plan.output)
        if dry_run:
            _print_plan(plan)
            caveat = reach_caveat(plan) if job.realign is not None else None
            if caveat:  # a real run logs it once its inputs are validated (api.convert_model)
                err.print(Panel(caveat, title="[bold yellow]warning: little room to realign", border_style="yellow"),
                          highlight=False)
            if job.realign is not None:
                _print_budget(realign_budget(job, plan))
            return
        with Progress(TextColumn("{task.description:<40}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("starting", total=plan.total_bytes)

            def tick(name: str, i: int, n: int, done: int, total: int) -> None:
                bar.update(task, completed=done, description=f"[{i}/{n}] {name}")

            res = convert_model(job, log=log, progress=tick, plan=plan)
        for f in res.removed:
            err.print(f"removed {f} (left by an earlier run on this target)", highlight=False, soft_wrap=True)
        for f in res.files:
            out.print(f"wrote {f} ({f.stat().st_size / 1e6:.1f} MB, {res.plan.bits_per_weight:.2f} bpw, {res.seconds:.1f} s)")

    run_guarded(work)


def _warn_custom(types: list[str], output: Path) -> None:
    """Loud, on stderr: a file with our custom tensor types does not load in stock llama.cpp."""
    from ..formats.types import qtype

    names = ", ".join(f"{n} (id {qtype(n).id})" for n in types)
    status = "".join(f"\n{n}: {CUSTOM_STATUS[n]}" for n in types if n in CUSTOM_STATUS)
    err.print(Panel(
        f"[bold]{names}[/]: qrealign-gguf custom tensor type. [bold]Stock llama.cpp (and every app built on it) "
        f"cannot load this file[/]: it stops with \"invalid ggml type\".\n"
        f"Run it with the patched llama.cpp (native/llama_patches, built on first use):\n"
        f"  qrealign-gguf run {output} -- -p \"Hello\" -n 64\n"
        f"or build it yourself: bash tools/build/build_llama.sh patched{status}",
        title="[bold yellow]warning: custom tensor type",
        border_style="yellow"), highlight=False)


def _print_plan(plan: Plan) -> None:
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


def _print_budget(b: RealignBudget) -> None:
    """The realignment's plan: memory per rank by part, against what is free now, and the time it should take."""
    gib = 1 << 30
    where = "GPU" if b.device == "cuda" else "host"
    parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in b.parts.items())
    verdict = "fits" if b.fits else "[bold red]does not fit[/]"
    out.print(f"realignment on {b.device}, {b.ranks} rank(s): ~{b.total_bytes / gib:.1f} GiB {where} memory per rank "
              f"({parts} GiB); {b.available_bytes / gib:.1f} GiB free: {verdict}")
    total_min = b.seconds_per_layer * b.n_layers / 60
    out.print(f"time: ~{b.seconds_per_layer:.0f} s per layer x {b.n_layers} layers = ~{total_min:.0f} min (rough: rates "
              f"measured now under this machine's current load; on an idle machine it matched one real 0.5B run)")
    if not b.fits:
        try:
            b.check()
        except InputError as e:
            out.print(str(e), highlight=False)
