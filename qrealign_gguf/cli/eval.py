"""`qrealign-gguf eval`: options -> api.evaluate_models, then the report table (evaluate/report.py)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import log, out, run_guarded


def eval_command(
    models: List[Path] = typer.Argument(..., help="GGUF files and/or Hugging Face model directories to evaluate"),
    harmful: Optional[Path] = typer.Option(None, "--harmful", help="harmful prompts (.jsonl/.txt): refusal rate"),
    benign: Optional[Path] = typer.Option(None, "--benign", help="benign prompts: answered rate, agreement with --reference, PPL/KLD text"),
    overrefusal: Optional[Path] = typer.Option(None, "--overrefusal", help="safe prompts with alarming words: over-refusal rate"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="reference model (.gguf or HF dir), e.g. the fine-tuned full-precision model: benign answers to agree with, KLD base"),
    judge: Optional[Path] = typer.Option(None, "--judge", help="aligned model (.gguf or HF dir) used as refusal classifier next to the keyword judge"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="greedy tokens per answer"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use only the first N prompts of each set"),
    n_parallel: int = typer.Option(8, "--n-parallel", help="sequences decoded together (llama.cpp) / batch size (HF)"),
    threads: int = typer.Option(0, "--threads", "-t", help="CPU threads (0 = all cores)"),
    no_kld: bool = typer.Option(False, "--no-kld", help="skip perplexity / KL divergence"),
    chat_template: str = typer.Option("jinja", "--chat-template", help="GGUF prompt formatting: jinja (the GGUF's template, as llama-server/llama-cli and transformers render it) or builtin (llama_chat_apply_template, like --no-jinja)"),
    system: Optional[str] = typer.Option(None, "--system", help="system message before every prompt, e.g. your deployment's (default: the chat template's own)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG plot"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full report (with every answer) as JSON"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="directory keeping generated answers (keyed by model content, prompts, settings) for reruns"),
    force: bool = typer.Option(False, "--force", "-f", help="replace existing --json / --plot files"),
) -> None:
    """Evaluate refusal, over-refusal, helpfulness and KLD of GGUF / HF models (greedy, chat template)."""
    from ..api import evaluate_models
    from ..evaluate.report import print_table

    def work() -> None:
        report = evaluate_models(models, harmful=harmful, benign=benign, overrefusal=overrefusal, reference=reference,
                                 judge=judge, max_new_tokens=max_new_tokens, limit=limit, n_parallel=n_parallel,
                                 threads=threads, kld=not no_kld, chat_template=chat_template, cache_dir=cache,
                                 json_out=json_out, plot=plot, force=force, log=log,
                                 system=system)
        print_table(report, out)
        for f in (json_out, plot):
            if f is not None:
                out.print(f"wrote {f}")

    run_guarded(work)
