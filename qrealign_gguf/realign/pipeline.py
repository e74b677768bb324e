"""Wiring for Q-realign: fine-tuned HF model + probes + prompts -> packed GGUF bytes for every decoder
layer's linear weights, layer by layer with checkpoints. convert() writes them (ConvertOptions.packed)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import InputError
from ..formats import codec
from ..prompts import load_prompts
from .calibrate import LayerStats, RealignSettings, Target, propagate, realign_layer
from .capture import capture
from .checkpoint import Checkpoints, file_digest, fingerprint, model_files_digest
from .hidden import chat_ids, check_compatible, decoder_layers, model_signature
from .probes import ProbeSet

Report = Callable[[int, int, LayerStats, bool], None]  # (layer, n_layers, stats, from_checkpoint)


def _targets(plan, layer: int, importance: dict[str, np.ndarray]) -> list[Target]:  # noqa: ANN001 - convert.Plan
    out = []
    for p in plan.tensors:
        if not p.source.name.startswith(f"blk.{layer}.") or not p.qtype.native or not p.source.is_matrix:
            continue
        m = re.search(rf"layers\.{layer}\.(.+)\.weight$", p.source.hf_name)
        if m is None:
            continue
        rows = p.source.shape[0]
        order = plan.family.transform(p.source.name, np.arange(rows, dtype=np.float32)[:, None]).astype(np.int64).ravel()
        if not np.array_equal(np.sort(order), np.arange(rows)):
            raise AssertionError(f"{p.source.name}: family transform of a matrix must be a row permutation")
        out.append(Target(m.group(1), p.source.name, p.qtype,
                          None if np.array_equal(order, np.arange(rows)) else order, importance.get(p.source.name)))
    return out


def _quantized_embedding(plan, importance: dict[str, np.ndarray], device: str = "cpu") -> torch.Tensor | None:  # noqa: ANN001
    """The token embedding as the file will store it (layer 0's real input); encoded on the GPU when realigning
    there (the CUDA codec writes the C codec's bytes)."""
    p = next((t for t in plan.tensors if t.source.name == "token_embd.weight"), None)
    if p is None or p.qtype.name == "F32":
        return None
    e = p.source.load()
    if p.qtype.name == "F16":
        return torch.from_numpy(codec.to_f16(e).astype(np.float32))
    if p.qtype.name == "BF16":
        return torch.from_numpy((codec.to_bf16(e).astype(np.uint32) << 16).view(np.float32))
    from ..formats import cuda_codec
    dev = "auto" if device == "cuda" else "cpu"
    data = cuda_codec.encode(p.qtype, e, importance.get(p.source.name), device=dev)
    return torch.from_numpy(codec.dequantize(data, p.qtype, e.shape[1]))


def _hard_from_packed(targets: list[Target], packed: dict[str, np.ndarray], cols: dict[str, int]) -> dict[str, torch.Tensor]:
    out = {}
    for t in targets:
        w = codec.dequantize(packed[t.gguf_name], t.qtype, cols[t.module])
        if t.row_order is not None:
            w = w[np.argsort(t.row_order)]  # back to HF row order
        out[f"{t.module}.weight"] = torch.from_numpy(w)
    return out


def default_checkpoint_dir(plan) -> Path:  # noqa: ANN001 - convert.Plan
    return Path(plan.output).with_suffix(".realign-ckpt")


def realign_model(finetuned: str | Path, plan, probes: ProbeSet, settings: RealignSettings,  # noqa: ANN001
                  harmful: str | Path = "builtin:harmful", benign: str | Path = "builtin:benign",
                  importance: dict[str, np.ndarray] | None = None, checkpoint_dir: str | Path | None = None,
                  report: Report | None = None, device: str = "cpu") -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    importance = importance or {}
    check_compatible(probes.meta, model_signature(finetuned), "the probes' model", str(finetuned))
    harm = load_prompts(harmful, limit=settings.n_harmful, expect_label=1)
    ben = load_prompts(benign, limit=settings.n_benign, expect_label=0)
    reliable = set(probes.reliable)
    if not reliable:
        raise InputError("no probe layer is reliable (held-out accuracy below the threshold); refit the probes "
                         "with more prompts or a lower --min-acc")

    fp = fingerprint({"version": __version__, "model": model_files_digest(finetuned),
                      "probes": [probes.w.sum().item(), probes.b.tolist(), probes.target.tolist(),
                                 probes.target_benign.tolist(), sorted(reliable)],
                      "harmful": [p.text for p in harm], "benign": [p.text for p in ben],
                      "settings": asdict(settings), "types": {t.source.name: t.qtype.name for t in plan.tensors},
                      "importance": sorted(importance)})
    ckpt = Checkpoints(checkpoint_dir or default_checkpoint_dir(plan), fp)

    model = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(finetuned)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids_b = [chat_ids(tok, p.text, settings.max_tokens) for p in ben]
    ids_h = [chat_ids(tok, p.text, settings.max_tokens) for p in harm]
    cache = capture(model, ids_b + ids_h, _quantized_embedding(plan, importance, device))
    nb = len(ids_b)
    layers = decoder_layers(model)
    xq = cache.q0
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(layers):
        layer.to(device)
        targets = _targets(plan, i, importance)
        kw = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()} for d in cache.kwargs[i]]
        if ckpt.done(i):
            packed, stats_d = ckpt.load(i)
            cols = {t.module: layer.get_submodule(t.module).weight.shape[1] for t in targets}
            hard = {k: v.to(device) for k, v in _hard_from_packed(targets, packed, cols).items()}
            stats = LayerStats(**stats_d)
            resumed = True
        else:
            score = (lambda h, i=i: probes.score(i, h)) if i in reliable else None
            margin = settings.margin if settings.margin is not None else float(probes.target[i])
            ceiling = (settings.benign_ceiling if settings.benign_ceiling is not None
                       else -settings.margin if settings.margin is not None else float(probes.target_benign[i]))
            packed, hard, stats = realign_layer(
                layer, targets,
                ([x.to(device) for x in xq[:nb]], [y.to(device) for y in cache.fp[i + 1][:nb]], kw[:nb]),
                ([x.to(device) for x in xq[nb:]], kw[nb:]), score, margin, ceiling, settings, i)
            ckpt.save(i, packed, stats)
            resumed = False
        out.update(packed)
        xq = [x.cpu() for x in propagate(layer, hard, [x.to(device) for x in xq], kw)]
        layer.to("cpu")
        if report:
            report(i, len(layers), stats, resumed)
    return out


# -- the CLI's two calls: check everything first, then do the long work ------------------------------------
@dataclass
class RealignRequest:
    finetuned: Path
    aligned: Path | None
    probes: Path | None
    harmful: str
    benign: str
    samples: int = 64
    iters: int = 40
    harm_weight: float = 1.0
    margin: float | None = None
    checkpoints: Path | None = None
    device: str = "auto"
    last_weight: float = 1.0
    benign_ceiling: float | None = None
    probe_kind: str = "content"  # with --aligned: "contrast" fits refusal-state probes against self.finetuned

    @property
    def settings(self) -> RealignSettings:
        return RealignSettings(iters=self.iters, harm_weight=self.harm_weight, margin=self.margin,
                               last_weight=self.last_weight, benign_ceiling=self.benign_ceiling,
                               n_benign=self.samples, n_harmful=self.samples)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible; use --device cpu")
    return name


def prepare_realign(req: RealignRequest, plan, console=None) -> ProbeSet | None:  # noqa: ANN001
    """Validate every realignment input; returns loaded probes (None when they will be fit on --aligned)."""
    if req.aligned is not None and req.probes is not None:
        raise InputError("give either --aligned or --probes, not both")
    if req.samples < 2 or req.iters < 0:
        raise InputError("--realign-samples must be >= 2 and --realign-iters >= 0")
    resolve_device(req.device)
    if req.probe_kind not in ("content", "contrast"):
        raise InputError(f"--probe-kind {req.probe_kind!r}: use content or contrast")
    if req.probe_kind == "contrast" and req.aligned is None:
        raise InputError("--probe-kind contrast fits probes on --aligned and this model; give --aligned (a probe "
                         "file from `qrealign-gguf probe --contrast` already knows its kind)")
    if not any(t.qtype.native for t in plan.tensors):
        raise InputError(f"--outtype {plan.outtype} has no quantized blocks to realign; choose e.g. Q8_0 or Q4_K_M")
    mine = model_signature(req.finetuned)
    load_prompts(req.harmful, expect_label=1)  # whole files: a bad line 400 must not surface hours later
    load_prompts(req.benign, expect_label=0)
    if req.aligned is not None:
        check_compatible(model_signature(req.aligned), mine, f"aligned model {req.aligned}", str(req.finetuned))
        return None
    probes = ProbeSet.load(req.probes)
    check_compatible(probes.meta, mine, f"probes {req.probes}", str(req.finetuned))
    return probes


def run_realign(req: RealignRequest, plan, probes: ProbeSet | None, opts, console=None) -> dict[str, np.ndarray]:  # noqa: ANN001
    from .probes import probe_model

    if probes is None:
        probes = probe_model(req.aligned, req.harmful, req.benign, console=console,
                             contrast=req.finetuned if req.probe_kind == "contrast" else None)
        if console:
            console.print(f"probes: {len(probes.reliable)}/{probes.n_layers} layers reliable "
                          f"(held-out accuracy {probes.heldout_acc.min():.2f}..{probes.heldout_acc.max():.2f})")

    def report(i: int, n: int, s: LayerStats, resumed: bool) -> None:
        if console:
            tag = "checkpoint" if resumed else f"{s.seconds:.0f}s"
            harm = (f"probe loss {s.harm_start:.3f}->{s.harm_end:.3f}, on the harmful side: harmful "
                    f"{s.harmful_side_start:.0%}->{s.harmful_side_end:.0%}, benign {s.benign_side_start:.0%}->"
                    f"{s.benign_side_end:.0%}") if s.probed else "no reliable probe"
            console.print(f"layer {i + 1}/{n} [{tag}]: benign rel. error {s.benign_start:.4f}->{s.benign_end:.4f}; {harm}",
                          highlight=False)

    packed = realign_model(req.finetuned, plan, probes, req.settings, req.harmful, req.benign,
                           importance=opts.importance, checkpoint_dir=req.checkpoints, report=report,
                           device=resolve_device(req.device))
    opts.extra_provenance.update({"realigned": True, "realign_iters": req.iters, "realign_harm_weight": req.harm_weight,
                                  "realign_margin": "aligned" if req.margin is None else req.margin,
                                  "realign_last_weight": req.last_weight,
                                  "realign_benign_ceiling": "aligned" if req.benign_ceiling is None else req.benign_ceiling,
                                  "realign_samples": req.samples,
                                  "realign_probe_kind": probes.meta.get("kind", "content"),
                                  "realign_probe_layers": ",".join(map(str, probes.reliable))})
    return packed
