"""The library: each command's whole flow as a function that takes plain values and returns results.

    from qrealign_gguf import ConvertJob, RealignOptions, convert_model
    result = convert_model(ConvertJob(model="finetuned/", output="out/", outtype="Q4_K_M",
                                      realign=RealignOptions(aligned="aligned/")))

Every input is validated here (numbers, files, outputs) before long work starts, so API callers get the same one-line
InputError as the command line; the CLI (qrealign_gguf/cli/) only parses, shows progress and maps errors to exit codes.
Progress comes through optional callbacks; nothing here prints. Heavy imports (torch, transformers) stay inside the
functions that need them. Under torchrun, convert_model runs data parallel (dist.py): every rank validates the
same inputs and computes its shard of the prompts, rank 0 alone touches outputs and reports progress.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, dist
from .checks import check_numbers
from .convert import ConvertOptions, ConvertResult, Progress, convert
from .errors import InputError
from .output import check_output, check_side_output, written_whole
from .plan import Plan, make_plan
from .progress import Log, as_console
from .realign.options import RealignOptions

if TYPE_CHECKING:
    from .realign.probes import ProbeSet

__all__ = ["ConvertJob", "ConvertResult", "RealignBudget", "RealignOptions", "convert_model", "evaluate_models",
           "package_model", "plan_conversion", "probe_model", "realign_budget"]


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
    dist_timeout: float = dist.DEFAULT_TIMEOUT_S  # under torchrun: seconds a rank waits for the others, then stops


def plan_conversion(job: ConvertJob) -> Plan:
    """The cheap part: numbers checked, model headers read, every tensor's type and the output name decided."""
    check_numbers(**{"--threads": (job.threads, ">=0"), "--calib-samples": (job.calib_samples, ">0"),
                     "--split-max-size": (job.split_max_size, ">=0"), "--dist-timeout": (job.dist_timeout, ">0")})
    if job.realign is not None:
        job.realign.check_numbers()
    return make_plan(job.model, job.output, job.outtype, pure=job.pure,
                     has_imatrix=job.imatrix is not None or job.calib is not None)


@dataclass(frozen=True)
class RealignBudget:
    """What a realignment will need, per rank, before anything is loaded (realign/budget.py)."""
    device: str  # "cpu" (host memory) or "cuda" (the GPU's)
    ranks: int
    parts: dict[str, int]  # bytes per rank: fixed, layer, streams, batch
    available_bytes: int  # what this machine has free now (cgroup / MemAvailable, or the GPU's free memory)
    seconds_per_layer: float
    n_layers: int
    budget: Any  # budget.Budget
    workload: Any  # budget.Workload

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.available_bytes

    def check(self) -> None:
        """InputError with the numbers and the option that would help, when it does not fit."""
        from .realign.budget import check_fits

        check_fits(self.budget, self.workload, self.available_bytes,
                   "the GPU" if self.device == "cuda" else "host memory")


def realign_budget(job: ConvertJob, plan: Plan | None = None, ranks: int | None = None) -> RealignBudget:
    """Memory per rank and time per layer of `job`'s realignment on its device (ranks: torchrun's world size by
    default); reads only headers and tokenizes the calibration prompts, and times a short matmul / fake_quant."""
    from .device import resolve_device
    from .realign.budget import available_host_bytes, plan_budget

    if job.realign is None:
        raise InputError("no realignment to plan: give --aligned or --probes")
    plan = plan or plan_conversion(job)
    device = resolve_device(job.device, "torch")
    ranks = ranks or (dist.launcher_env() or (0, 1, 0))[1]
    _, w, b = plan_budget(plan, job.realign, device, ranks)
    if device == "cuda":
        import torch

        available = int(torch.cuda.mem_get_info()[0])
    else:
        available = available_host_bytes()
    return RealignBudget(device, ranks, dict(b.parts), available, b.seconds_per_layer, b.n_layers, b, w)


def convert_model(job: ConvertJob, *, log: Log | None = None, progress: Progress | None = None,
                  plan: Plan | None = None, world: dist.World | None = None) -> ConvertResult:
    """plan -> output checks -> (realignment inputs checked) -> importance -> probes and realignment -> write ->
    read back -> checkpoints removed. `plan`: from plan_conversion(job), when the caller already made it.
    Started by torchrun (or given `world`): data parallel over the prompts; rank 0 writes and returns the files,
    the other ranks return no files."""
    if world is None and dist.launcher_env() is not None:  # torchrun: join its job here, leave it when done
        device = "cpu"
        if job.realign is not None:  # only the realignment computes on the ranks: its device picks the backend
            from .device import resolve_device
            device = resolve_device(job.device, "torch")
        with dist.session(device, job.dist_timeout) as joined:
            return _convert(job, log, progress, plan, joined)
    return _convert(job, log, progress, plan, world or dist.single())


def _convert(job: ConvertJob, log: Log | None, progress: Progress | None, plan: Plan | None,
             world: dist.World) -> ConvertResult:
    if job.realign is not None:  # it imports torch, which plain conversion does without
        from .realign.pipeline import default_checkpoint_dir, prepare_realign, run_realign

    t0 = time.perf_counter()
    plan = plan or plan_conversion(job)
    if world.size > 1:
        dist.check_same(world, job_fields(job, plan))  # a rank started differently would compute another job
        if not world.is_main:  # rank 0 speaks for the job
            log = progress = None
    save_imatrix = Path(job.save_imatrix) if job.save_imatrix is not None else None
    model = Path(job.model)

    def validate() -> ProbeSet | None:
        if world.is_main:  # outputs are rank 0's alone; every rank checks every input
            check_output(plan, split_max_size=job.split_max_size, force=job.force)  # before hours of calibration
        if save_imatrix is not None:
            if job.calib is None:
                raise InputError("--save-imatrix writes the importance computed from --calib; give --calib too")
            if world.is_main:
                check_side_output(save_imatrix, "--save-imatrix", job.force, clash=plan.output)
        if job.calib is not None and world.size > 1:  # every rank adds its prompts' sums: none may be without
            from .prompts import load_prompts
            n = len(load_prompts(job.calib, limit=job.calib_samples))
            if n < world.size:
                raise InputError(f"--calib {job.calib}: {n} prompts for {world.size} ranks; give every rank at least one")
        if job.realign is None:
            return None
        probes = prepare_realign(job.realign, model, plan, job.device, ranks=world.size)
        realign_budget(job, plan, world.size).check()  # a run that cannot fit stops here, not after hours
        return probes

    probes = dist.agree(world, validate)  # one rank's bad input stops every rank, with one line
    if job.realign is not None and log is not None:  # after validation: bad input stays one line, nothing else
        from .realign.reach import reach_caveat

        caveat = reach_caveat(plan)
        if caveat:
            log(f"warning: little room to realign: {caveat}")
    provenance: dict[str, Any] = {}
    importance = None
    shared = {"world": world} if world.size > 1 else {}  # a single process calls the plain functions
    if job.calib is not None:
        from .calib import compute_importance
        with written_whole(save_imatrix if world.is_main else None, job.force) as imatrix_tmp:
            importance = compute_importance(plan.family, job.calib, job.calib_samples, imatrix_tmp,
                                            console=as_console(log),
                                            offload_dir=job.realign.offload_dir if job.realign else None, **shared)
        provenance["imatrix"] = f"computed from {Path(job.calib).name} ({job.calib_samples} prompts)"
    packed = None
    if job.realign is not None:
        packed, realigned = run_realign(job.realign, model, plan, probes, importance=importance, threads=job.threads,
                                        device=job.device, log=log, **shared)
        provenance.update(realigned)
    if not world.is_main:  # the file is rank 0's to write; this rank's share of the work is done
        return ConvertResult([], plan, time.perf_counter() - t0, provenance=provenance)
    opts = ConvertOptions(outtype=plan.outtype, imatrix=job.imatrix, importance=importance, pure=job.pure,
                          split_max_size=job.split_max_size, metadata=dict(job.metadata), threads=job.threads,
                          force=job.force, extra_provenance=provenance, packed=packed, device=job.device)
    result = convert(model, job.output, opts, progress=progress, plan=plan)
    if job.realign is not None and job.realign.checkpoints is None:  # written and verified: their purpose is served
        shutil.rmtree(default_checkpoint_dir(plan), ignore_errors=True)
    return result


def job_fields(job: ConvertJob, plan: Plan) -> dict[str, str]:
    """What every rank of a job must agree on, as text: each argument, the planned tensors (a rank on another copy
    of the model reads other headers) and the version."""
    def text(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    out = {f.name: text(getattr(job, f.name)) for f in dataclasses.fields(job) if f.name != "realign"}
    if job.realign is not None:
        out.update({f"realign.{f.name}": text(getattr(job.realign, f.name)) for f in dataclasses.fields(job.realign)})
    tensors = [[t.source.name, list(t.source.shape), t.qtype.name] for t in plan.tensors]
    out["planned tensors"] = "sha256:" + hashlib.sha256(text(tensors).encode()).hexdigest()[:16]
    out["qrealign-gguf version"] = text(__version__)
    return out


def probe_model(model: str | Path, output: str | Path | None = None, *, harmful: str | Path = "builtin:harmful",
                benign: str | Path = "builtin:benign", samples: int = 256, min_acc: float = 0.9,
                contrast: str | Path | None = None, plot: str | Path | None = None, force: bool = False,
                log: Log | None = None, offload_dir: str | Path | None = None,
                dist_timeout: float = dist.DEFAULT_TIMEOUT_S, world: dist.World | None = None,
                exclude_benign_shift: bool = False) -> ProbeSet:
    """Fit per-layer safety probes on the ALIGNED model (`qrealign-gguf probe`); saved to `output` when given,
    their accuracy per layer plotted to `plot` (PNG) when given. The model runs one decoder layer at a time;
    `offload_dir` keeps that layer's activations in files there instead of memory.
    Started by torchrun (or given `world`): each rank runs its shard of the prompts, the states are gathered, every
    rank fits the same probes and returns them; rank 0 alone writes the files.
    exclude_benign_shift (with contrast): the probes ignore the change the fine-tune made on benign prompts too (a
    persona, a style), so they measure refusal alone (realign/probes.py fit_contrast_probes)."""
    if world is None and dist.launcher_env() is not None:  # torchrun: join its job here, leave it when done
        with dist.session("cpu", dist_timeout) as joined:  # the states are computed on the CPU
            return _probe(model, output, harmful, benign, samples, min_acc, contrast, plot, force, log, offload_dir,
                          joined, exclude_benign_shift)
    return _probe(model, output, harmful, benign, samples, min_acc, contrast, plot, force, log, offload_dir,
                  world or dist.single(), exclude_benign_shift)


def _probe(model: str | Path, output: str | Path | None, harmful: str | Path, benign: str | Path, samples: int,
           min_acc: float, contrast: str | Path | None, plot: str | Path | None, force: bool, log: Log | None,
           offload_dir: str | Path | None, world: dist.World, exclude_benign_shift: bool) -> ProbeSet:
    from .realign.options import check_offload_dir
    from .realign.probes import probe_model as fit

    out = Path(output) if output is not None else None
    png = Path(plot) if plot is not None else None
    if world.size > 1:  # a rank started differently would gather states of other prompts or another model
        args = {"model": model, "output": output, "harmful": harmful, "benign": benign, "samples": samples,
                "min_acc": min_acc, "contrast": contrast, "plot": plot, "force": force, "version": __version__,
                "exclude_benign_shift": exclude_benign_shift}
        dist.check_same(world, {k: json.dumps(v, default=str) for k, v in args.items()})
        if not world.is_main:  # rank 0 speaks for the job
            log = None

    def validate() -> None:
        check_numbers(**{"--samples": (samples, ">0"), "--min-acc": (min_acc, "0..1")})
        check_offload_dir(offload_dir)
        if exclude_benign_shift and contrast is None:
            raise InputError("--exclude-benign-shift needs --contrast FINETUNED (it refines contrast probes)")
        if samples < world.size:
            raise InputError(f"--samples {samples} for {world.size} ranks; give every rank at least one prompt")
        if world.is_main:  # outputs are rank 0's alone; every rank checks every input
            if out is not None:
                check_side_output(out, "-o", force)
            if png is not None:
                check_side_output(png, "--plot", force, clash=out)

    dist.agree(world, validate)  # one rank's bad input stops every rank, with one line
    ps = fit(model, harmful, benign, samples, min_acc, console=as_console(log), contrast=contrast,
             offload_dir=offload_dir, world=world, exclude_benign_shift=exclude_benign_shift)
    if world.size > 1:  # fit from the same gathered states: a rank with other probes means a non-deterministic fit
        dist.check_identical(world, "the probes", ps.digest())
    if not world.is_main:
        return ps
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
                    plot: str | Path | None = None, force: bool = False, log: Log | None = None,
                    system: str | None = None) -> dict:
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
                      log=log, cache_dir=_path(cache_dir), system=system)
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
