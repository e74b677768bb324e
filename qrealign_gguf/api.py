"""The library: each command's whole flow as a function that takes plain values and returns results.

    from qrealign_gguf import ConvertJob, RealignOptions, convert_model
    result = convert_model(ConvertJob(model="finetuned/", output="out/", outtype="Q4_K_M",
                                      realign=RealignOptions(aligned="aligned/")))

Every input is validated here (numbers, files, outputs) before long work starts, so API callers get the same one-line
InputError as the command line; the CLI (qrealign_gguf/cli/) only parses, shows progress and maps errors to exit codes.
Progress comes through optional callbacks; nothing here prints. Heavy imports (torch, transformers) stay inside the
functions that need them.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import check_numbers
from .convert import ConvertOptions, ConvertResult, Progress, convert
from .errors import InputError
from .output import check_output, check_side_output, written_whole
from .plan import Plan, make_plan
from .progress import Log, as_console
from .realign.options import RealignOptions

if TYPE_CHECKING:
    from .realign.probes import ProbeSet

__all__ = ["ConvertJob", "ConvertResult", "RealignOptions", "convert_model", "evaluate_models", "package_model",
           "plan_conversion", "probe_model"]


@dataclass(kw_only=True)
class ConvertJob:
    """One conversion (`qrealign-gguf convert`); `realign` set = realign safety while quantizing."""
    model: str | Path  # Hugging Face model directory (config.json + *.safetensors)
    output: str | Path = Path(".")  # .gguf file, or a directory for <Name>-<Size>-<TYPE>.gguf
    outtype: str = "Q8_0"
    imatrix: str | Path | None = None  # llama.cpp imatrix GGUF
    calib: str | Path | None = None  # prompts to compute the importance from (instead of / besides imatrix)
    calib_samples: int = 128
    save_imatrix: str | Path | None = None  # also write the calib importance as an imatrix GGUF
    pure: bool = False
    split_max_size: int = 0  # bytes per shard, 0 = one file
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF keys to set or override
    threads: int = 0  # 0 = all cores
    force: bool = False  # replace existing outputs
    device: str = "auto"  # auto | cpu | cuda: encoders and realignment's torch work
    realign: RealignOptions | None = None


def plan_conversion(job: ConvertJob) -> Plan:
    """The cheap part: numbers checked, model headers read, every tensor's type and the output name decided."""
    check_numbers(**{"--threads": (job.threads, ">=0"), "--calib-samples": (job.calib_samples, ">0"),
                     "--split-max-size": (job.split_max_size, ">=0")})
    if job.realign is not None:
        job.realign.check_numbers()
    return make_plan(job.model, job.output, job.outtype, pure=job.pure,
                     has_imatrix=job.imatrix is not None or job.calib is not None)


def convert_model(job: ConvertJob, *, log: Log | None = None, progress: Progress | None = None,
                  plan: Plan | None = None) -> ConvertResult:
    """plan -> output checks -> (realignment inputs checked) -> importance -> probes and realignment -> write ->
    read back -> checkpoints removed. `plan`: from plan_conversion(job), when the caller already made it."""
    if job.realign is not None:  # it imports torch, which plain conversion does without
        from .realign.pipeline import default_checkpoint_dir, prepare_realign, run_realign

    plan = plan or plan_conversion(job)
    check_output(plan, split_max_size=job.split_max_size, force=job.force)  # before hours of calibration
    save_imatrix = Path(job.save_imatrix) if job.save_imatrix is not None else None
    if save_imatrix is not None:
        if job.calib is None:
            raise InputError("--save-imatrix writes the importance computed from --calib; give --calib too")
        check_side_output(save_imatrix, "--save-imatrix", job.force, clash=plan.output)
    model = Path(job.model)
    probes = prepare_realign(job.realign, model, plan, job.device) if job.realign is not None else None
    provenance: dict[str, Any] = {}
    importance = None
    if job.calib is not None:
        from .calib import compute_importance
        with written_whole(save_imatrix, job.force) as imatrix_tmp:
            importance = compute_importance(plan.family, job.calib, job.calib_samples, imatrix_tmp,
                                            console=as_console(log))
        provenance["imatrix"] = f"computed from {Path(job.calib).name} ({job.calib_samples} prompts)"
    packed = None
    if job.realign is not None:
        packed, realigned = run_realign(job.realign, model, plan, probes, importance=importance, threads=job.threads,
                                        device=job.device, log=log)
        provenance.update(realigned)
    opts = ConvertOptions(outtype=plan.outtype, imatrix=job.imatrix, importance=importance, pure=job.pure,
                          split_max_size=job.split_max_size, metadata=dict(job.metadata), threads=job.threads,
                          force=job.force, extra_provenance=provenance, packed=packed, device=job.device)
    result = convert(model, job.output, opts, progress=progress, plan=plan)
    if job.realign is not None and job.realign.checkpoints is None:  # written and verified: their purpose is served
        shutil.rmtree(default_checkpoint_dir(plan), ignore_errors=True)
    return result


def probe_model(model: str | Path, output: str | Path | None = None, *, harmful: str | Path = "builtin:harmful",
                benign: str | Path = "builtin:benign", samples: int = 256, min_acc: float = 0.9,
                contrast: str | Path | None = None, plot: str | Path | None = None, force: bool = False,
                log: Log | None = None) -> ProbeSet:
    """Fit per-layer safety probes on the ALIGNED model (`qrealign-gguf probe`); saved to `output` when given,
    their accuracy per layer plotted to `plot` (PNG) when given."""
    from .realign.probes import probe_model as fit

    check_numbers(**{"--samples": (samples, ">0"), "--min-acc": (min_acc, "0..1")})
    out = Path(output) if output is not None else None
    png = Path(plot) if plot is not None else None
    if out is not None:
        check_side_output(out, "-o", force)
    if png is not None:
        check_side_output(png, "--plot", force, clash=out)
    ps = fit(model, harmful, benign, samples, min_acc, console=as_console(log), contrast=contrast)
    with written_whole(out, force) as tmp:
        if tmp is not None:
            ps.save(tmp)
    if png is not None:
        from .evaluate.report import plot_probe_accuracy
        with written_whole(png, force) as tmp:
            plot_probe_accuracy(ps.heldout_acc.tolist(), tmp, extra={"train": ps.train_acc.tolist()})
    return ps


def evaluate_models(models: list[str | Path], *, harmful: str | Path | None = None, benign: str | Path | None = None,
                    overrefusal: str | Path | None = None, reference: str | Path | None = None,
                    judge: str | Path | None = None, max_new_tokens: int = 128, limit: int | None = None,
                    n_parallel: int = 8, threads: int = 0, kld: bool = True, chat_template: str = "jinja",
                    cache_dir: str | Path | None = None, json_out: str | Path | None = None,
                    plot: str | Path | None = None, force: bool = False, log: Log | None = None) -> dict:
    """Refusal, over-refusal, helpfulness and KLD of GGUF files / HF directories (`qrealign-gguf eval`); returns the
    report (evaluate/report.py), also written to `json_out` / plotted to `plot` when given."""
    from .evaluate.report import plot_report, write_json
    from .evaluate.run import run_eval

    js = Path(json_out) if json_out is not None else None
    png = Path(plot) if plot is not None else None
    if js is not None:
        check_side_output(js, "--json", force, make_parents=True)
    if png is not None:
        check_side_output(png, "--plot", force, clash=js, make_parents=True)
    t0 = time.perf_counter()
    report = run_eval([Path(m) for m in models], _path(harmful), _path(benign), _path(overrefusal), _path(reference),
                      _path(judge), max_new_tokens, limit, n_parallel, threads, kld=kld, template=chat_template,
                      log=log, cache_dir=_path(cache_dir))
    report["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
    if js is not None:
        js.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(js, force) as tmp:  # renamed into place when complete: never half a report
            write_json(report, tmp)
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(png, force) as tmp:
            plot_report(report, tmp)
    return report


def package_model(gguf_path: str | Path, output: str | Path | None = None, *, eval_report: str | Path | None = None,
                  force: bool = False, target: str | None = None, log: Log | None = None) -> Path:
    """Bundle a GGUF (every shard) with provenance, model card and checksums for a device (`qrealign-gguf
    package`); returns the .tar written. target "host" or "linux-aarch64": the bundle also carries llama.cpp built
    for that device (static; built on first use, minutes, announced through `log`) and a run.sh that starts the
    model there."""
    from .package import package

    return package(Path(gguf_path), _path(output), _path(eval_report), force=force, target=target, log=log)


def _path(p: str | Path | None) -> Path | None:
    return Path(p) if p is not None else None
