"""Wiring for Q-realign: fine-tuned HF model + probes + prompts -> packed GGUF bytes for every decoder
layer's linear weights, layer by layer with checkpoints. convert() writes them (ConvertOptions.packed)."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..chat import chat_ids
from ..errors import InputError
from ..formats import codec
from ..prompts import load_prompts
from .calibrate import LayerStats, RealignSettings, Target, propagate, realign_layer
from . import equalize
from .capture import capture
from .checkpoint import Checkpoints, file_digest, fingerprint, model_files_digest
from .hidden import check_compatible, decoder_layers, model_signature
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


EQUALIZE_ARCHS = ("llama", "qwen2")  # their norms and biases go to GGUF unchanged; gemma's are 1 + w

# HF module of a layer -> the GGUF tensor it is written to, for the F32 tensors equalization rescales
_EQ_EXTRAS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.v_proj.bias": "attn_v.bias", "mlp.up_proj.bias": "ffn_up.bias"}


def _equalize(layer: torch.nn.Module, i: int, targets: list[Target], xs: list[torch.Tensor], kws: list[dict],
              n_heads: int, n_kv: int) -> tuple[list[Target], dict[str, np.ndarray], list[equalize.GroupReport]]:
    """Fold the exact scalings into `layer` (in place), chosen on the benign prompts' inputs xs. Returns the
    targets with their imatrix moved along, and the rescaled F32 tensors (norms, v/up biases) as GGUF bytes."""
    why = equalize.supported(layer)
    if why is not None:
        raise InputError(f"--equalize: decoder layer {i} has {why}; convert without --equalize")

    def run() -> None:
        for x, kw in zip(xs, kws):
            layer(x, **kw)

    enc = {t.module: (t.qtype, t.importance) for t in targets}
    scales, reports = equalize.choose(layer, run, enc, n_heads, n_kv)
    equalize.fold(layer, scales, n_heads, n_kv)
    moved = []
    for t in targets:
        cs = equalize.column_scale(t.module, scales, n_heads, n_kv)
        im = t.importance if t.importance is None or cs is None else (t.importance / cs.astype(np.float64) ** 2).astype(np.float32)
        moved.append(replace(t, importance=im))
    extras = {}
    for hf, gg in _EQ_EXTRAS.items():
        p = _param(layer, hf)
        if p is not None:  # llama/qwen2 store these unchanged (equalize runs only where the family transform is identity)
            extras[f"blk.{i}.{gg}"] = p.detach().float().cpu().numpy().copy()
    return moved, extras, reports


def _param(layer: torch.nn.Module, name: str) -> torch.nn.Parameter | None:
    try:
        return layer.get_parameter(name)
    except AttributeError:  # e.g. no v bias in llama
        return None


@torch.no_grad()
def _load_extras(layer: torch.nn.Module, i: int, packed: dict[str, np.ndarray]) -> None:
    """A resumed layer: put the checkpoint's rescaled norms/biases back so propagation sees the stored layer."""
    for hf, gg in _EQ_EXTRAS.items():
        data = packed.get(f"blk.{i}.{gg}")
        if data is not None:
            p = layer.get_parameter(hf)
            p.copy_(torch.from_numpy(np.asarray(data).view(np.float32).reshape(p.shape)))


def parse_layers(spec: str | None, n_layers: int) -> frozenset[int]:
    """--probe-layers: comma-separated layers and ranges, "3-" open-ended ("0,2,5-7", "4-"); None = all."""
    if spec is None:
        return frozenset(range(n_layers))
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(-(\d*))?", part)
        if m is None:
            raise InputError(f"--probe-layers {spec!r}: use layer numbers and ranges, e.g. 3- or 0,2,4-6")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else n_layers - 1)
        if lo >= n_layers or hi < lo:
            raise InputError(f"--probe-layers {spec!r}: {part} is not a range inside layers 0-{n_layers - 1}")
        out.update(range(lo, min(hi, n_layers - 1) + 1))
    return frozenset(out)


def probed_layers(probes: ProbeSet, spec: str | None) -> frozenset[int]:
    """The layers that get the probe term: reliable and selected by --probe-layers."""
    reliable = frozenset(probes.reliable)
    if not reliable:
        raise InputError("no probe layer is reliable (held-out accuracy below the threshold); refit the probes "
                         "with more prompts or a lower --min-acc")
    probed = reliable & parse_layers(spec, probes.n_layers)
    if not probed:
        raise InputError(f"--probe-layers {spec}: none of these layers has a reliable probe "
                         f"(reliable: {sorted(reliable)})")
    return probed


def default_checkpoint_dir(plan) -> Path:  # noqa: ANN001 - convert.Plan
    return Path(plan.output).with_suffix(".realign-ckpt")


def realign_model(finetuned: str | Path, plan, probes: ProbeSet, settings: RealignSettings,  # noqa: ANN001
                  harmful: str | Path = "builtin:harmful", benign: str | Path = "builtin:benign",
                  importance: dict[str, np.ndarray] | None = None, checkpoint_dir: str | Path | None = None,
                  report: Report | None = None, device: str = "cpu",
                  report_equalize: Callable[[int, list], None] | None = None) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    importance = importance or {}
    check_compatible(probes.meta, model_signature(finetuned), "the probes' model", str(finetuned))
    harm = load_prompts(harmful, limit=settings.n_harmful, expect_label=1)
    ben = load_prompts(benign, limit=settings.n_benign, expect_label=0)
    probed = probed_layers(probes, settings.probe_layers)

    fp = fingerprint({"version": __version__, "model": model_files_digest(finetuned),
                      "probes": [probes.w.sum().item(), probes.b.tolist(), probes.target.tolist(),
                                 probes.target_benign.tolist(), sorted(set(probes.reliable))],
                      "harmful": [p.text for p in harm], "benign": [p.text for p in ben],
                      "settings": asdict(settings), "types": {t.source.name: t.qtype.name for t in plan.tensors},
                      "importance": sorted(importance)})
    ckpt = Checkpoints(checkpoint_dir or default_checkpoint_dir(plan), fp)

    model = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(finetuned)
    ids_b = [chat_ids(tok, p.text, settings.max_tokens) for p in ben]
    ids_h = [chat_ids(tok, p.text, settings.max_tokens) for p in harm]
    cache = capture(model, ids_b + ids_h, _quantized_embedding(plan, importance, device))
    nb = len(ids_b)
    layers = decoder_layers(model)
    planned = {t.source.name: t.qtype.name for t in plan.tensors}
    n_heads = int(model.config.num_attention_heads)
    n_kv = int(getattr(model.config, "num_key_value_heads", None) or n_heads)
    xq = cache.q0
    out: dict[str, np.ndarray] = {}
    for i, layer in enumerate(layers):
        layer.to(device)
        targets = _targets(plan, i, importance)
        kw = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()} for d in cache.kwargs[i]]
        if ckpt.done(i):
            packed, stats_d = ckpt.load(i)
            _load_extras(layer, i, packed)
            cols = {t.module: layer.get_submodule(t.module).weight.shape[1] for t in targets}
            hard = {k: v.to(device) for k, v in _hard_from_packed(targets, packed, cols).items()}
            stats = LayerStats(**stats_d)
            resumed = True
        else:
            extras: dict[str, np.ndarray] = {}
            xb = [x.to(device) for x in xq[:nb]]
            if settings.equalize:
                targets, extras, eq_reports = _equalize(layer, i, targets, xb, kw[:nb], n_heads, n_kv)
                if report_equalize:
                    report_equalize(i, eq_reports)
            score = (lambda h, i=i: probes.score(i, h)) if i in probed else None
            margin = (settings.margin if settings.margin is not None else float(probes.target[i])) + settings.margin_offset
            ceiling = (settings.benign_ceiling if settings.benign_ceiling is not None
                       else -settings.margin if settings.margin is not None else float(probes.target_benign[i]))
            packed, hard, stats = realign_layer(
                layer, targets,
                (xb, [y.to(device) for y in cache.fp[i + 1][:nb]], kw[:nb]),
                ([x.to(device) for x in xq[nb:]], kw[nb:]), score, margin, ceiling, settings, i)
            for name in extras:  # an internal invariant: norms and biases are written as F32
                if planned.get(name) != "F32":
                    raise AssertionError(f"{name}: equalization rescaled it but the plan writes it as {planned.get(name)}")
            packed.update(extras)
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
    # defaults: RealignSettings' own (one source; the CLI's option defaults are tested against them)
    samples: int = RealignSettings.n_benign
    iters: int = RealignSettings.iters
    harm_weight: float = RealignSettings.harm_weight
    margin: float | None = RealignSettings.margin
    checkpoints: Path | None = None
    device: str = "auto"
    last_weight: float = RealignSettings.last_weight
    benign_ceiling: float | None = RealignSettings.benign_ceiling
    probe_kind: str = "content"  # with --aligned: "contrast" fits refusal-state probes against self.finetuned
    equalize: bool = RealignSettings.equalize
    margin_offset: float = RealignSettings.margin_offset
    probe_layers: str | None = RealignSettings.probe_layers  # e.g. "3-": probe term only there
    lr: float = RealignSettings.lr

    @property
    def settings(self) -> RealignSettings:
        return RealignSettings(iters=self.iters, harm_weight=self.harm_weight, margin=self.margin,
                               last_weight=self.last_weight, benign_ceiling=self.benign_ceiling,
                               n_benign=self.samples, n_harmful=self.samples, equalize=self.equalize,
                               margin_offset=self.margin_offset, probe_layers=self.probe_layers, lr=self.lr)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible; use --device cpu")
    return name


def check_finite_weights(plan) -> None:  # noqa: ANN001 - convert.Plan
    """Read every tensor once before the long work: a NaN or Inf weight would otherwise surface only when the
    file is written, after the whole realignment (the write refuses it, so nothing bad is left, but hours are lost)."""
    for t in plan.tensors:
        if not np.isfinite(t.source.load()).all():
            raise InputError(f"tensor {t.source.hf_name or t.source.name} contains NaN or Inf values; "
                             "the checkpoint is broken, fix it before converting")


def prepare_realign(req: RealignRequest, plan, console=None) -> ProbeSet | None:  # noqa: ANN001
    """Validate every realignment input; returns loaded probes (None when they will be fit on --aligned)."""
    if req.aligned is not None and req.probes is not None:
        raise InputError("give either --aligned or --probes, not both")
    if req.samples < 2 or req.iters < 0:
        raise InputError("--realign-samples must be >= 2 and --realign-iters >= 0")
    if not 0 < req.lr <= 0.5:
        raise InputError(f"--realign-lr {req.lr} is out of range: give a step in code units in (0, 0.5], e.g. 5e-3")
    resolve_device(req.device)
    if req.probe_kind not in ("content", "contrast"):
        raise InputError(f"--probe-kind {req.probe_kind!r}: use content or contrast")
    if req.probe_kind == "contrast" and req.aligned is None:
        raise InputError("--probe-kind contrast fits probes on --aligned and this model; give --aligned (a probe "
                         "file from `qrealign-gguf probe --contrast` already knows its kind)")
    if req.equalize and plan.family.arch not in EQUALIZE_ARCHS:
        raise InputError(f"--equalize supports {', '.join(EQUALIZE_ARCHS)} models (plain RMSNorm weights); this one "
                         f"is {plan.family.arch}: convert without --equalize")
    if not any(t.qtype.native for t in plan.tensors):
        raise InputError(f"--outtype {plan.outtype} has no quantized blocks to realign; choose e.g. Q8_0 or Q4_K_M")
    mine = model_signature(req.finetuned)
    parse_layers(req.probe_layers, int(mine["num_hidden_layers"]))
    load_prompts(req.harmful, expect_label=1)  # whole files: a bad line 400 must not surface hours later
    load_prompts(req.benign, expect_label=0)
    check_finite_weights(plan)
    if req.aligned is not None:
        check_compatible(model_signature(req.aligned), mine, f"aligned model {req.aligned}", str(req.finetuned))
        return None
    probes = ProbeSet.load(req.probes)
    check_compatible(probes.meta, mine, f"probes {req.probes}", str(req.finetuned))
    return probes


def run_realign(req: RealignRequest, plan, probes: ProbeSet | None, opts, console=None) -> dict[str, np.ndarray]:  # noqa: ANN001
    from .probes import probe_model

    if opts.threads > 0:  # torch's OpenMP threads spin: next to another job, layers once ran ~10x slower here
        torch.set_num_threads(opts.threads)
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
                    f"{s.benign_side_end:.0%}") if s.probed else "no probe term (unreliable or not in --probe-layers)"
            console.print(f"blk.{i} ({i + 1}/{n}) [{tag}]: benign rel. error {s.benign_start:.4f}->{s.benign_end:.4f}; {harm}",
                          highlight=False)

    def report_eq(i: int, groups: list[equalize.GroupReport]) -> None:
        if console:
            parts = [f"{g.name} {g.error_after / g.error_before:.2f}x" if g.error_before > 0 else f"{g.name} -"
                     for g in groups]
            console.print(f"blk.{i}: equalized, RTN output error " + ", ".join(parts), highlight=False)

    packed = realign_model(req.finetuned, plan, probes, req.settings, req.harmful, req.benign,
                           importance=opts.importance, checkpoint_dir=req.checkpoints, report=report,
                           device=resolve_device(req.device), report_equalize=report_eq)
    opts.extra_provenance.update({"realigned": True, "realign_iters": req.iters, "realign_lr": req.lr,
                                  "realign_harm_weight": req.harm_weight,
                                  "realign_margin": "aligned" if req.margin is None else req.margin,
                                  "realign_margin_offset": req.margin_offset,
                                  "realign_last_weight": req.last_weight,
                                  "realign_benign_ceiling": "aligned" if req.benign_ceiling is None else req.benign_ceiling,
                                  "realign_samples": req.samples,
                                  "realign_probe_kind": probes.meta.get("kind", "content"),
                                  "realign_equalize": req.equalize,
                                  "realign_probe_layers": ",".join(map(str, sorted(probed_layers(probes, req.probe_layers))))})
    return packed
