"""`qrealign-gguf probe`: fit the safety probes (api.probe_model) and show their accuracy per layer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..dist import DEFAULT_TIMEOUT_S
from .common import log, out, run_guarded


def probe(
    model: Path = typer.Argument(..., help="the ALIGNED Hugging Face model (the one that still refuses)"),
    output: Path = typer.Option(..., "-o", "--output", help="probes file (.safetensors)"),
    harmful: str = typer.Option("builtin:harmful", "--harmful", help="harmful prompts (.jsonl, label 1)"),
    benign: str = typer.Option("builtin:benign", "--benign", help="benign prompts (.jsonl, label 0)"),
    samples: int = typer.Option(256, "--samples", help="prompts of each kind"),
    min_acc: float = typer.Option(0.9, "--min-acc", help="held-out accuracy a layer's probe needs to be used"),
    contrast: Optional[Path] = typer.Option(None, "--contrast", help="the FINE-TUNED model: fit refusal-state probes (aligned vs fine-tuned states on harmful prompts) instead of content probes"),
    exclude_benign_shift: bool = typer.Option(False, "--exclude-benign-shift", help="with --contrast: also run the aligned model on the benign prompts and fit the probes without the change the fine-tune made there too (a persona or style), so they measure refusal alone"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of probe accuracy per layer"),
    force: bool = typer.Option(False, "--force", "-f", help="replace an existing output file and --plot file"),
    offload_dir: Optional[Path] = typer.Option(None, "--offload-dir", help="keep the per-layer activations in files under this directory instead of memory, for large prompt sets; removed when done"),
    dist_timeout: float = typer.Option(DEFAULT_TIMEOUT_S, "--dist-timeout", help="under torchrun: seconds a rank waits for the others in one exchange before the whole job stops with one line"),
) -> None:
    """Fit per-layer linear safety probes on the aligned model's last-token states.
    Under torchrun (`torchrun --nproc-per-node N -m qrealign_gguf probe ...`) the prompts are shared out over the ranks."""
    from ..api import probe_model

    def work() -> None:
        ps = probe_model(model, output, harmful=harmful, benign=benign, samples=samples, min_acc=min_acc,
                         contrast=contrast, plot=plot, force=force, log=log,
                         offload_dir=offload_dir, dist_timeout=dist_timeout,
                         exclude_benign_shift=exclude_benign_shift)
        t = Table(title=f"probe accuracy per layer ({len(ps.reliable)}/{ps.n_layers} reliable at >= {min_acc:.2f})")
        # with --exclude-benign-shift: how much of the fine-tune's change on harmful prompts it also made on benign
        # ones (cosine of the two mean shifts); that part is not refusal and the probes ignore it
        cos = json.loads(ps.meta.get("benign_shift_cos", "[]"))
        for col in ("layer", "train", "held-out", "used") + (("benign-shift cos",) if cos else ()):
            t.add_column(col, justify="right")
        for i in range(ps.n_layers):
            t.add_row(str(i), f"{ps.train_acc[i]:.3f}", f"{ps.heldout_acc[i]:.3f}", "yes" if i in ps.reliable else "",
                      *((f"{cos[i]:+.2f}",) if cos else ()))
        out.print(t)
        out.print(f"wrote {output}")

    run_guarded(work)
