"""Wiring for Q-realign: fine-tuned HF model + probes + prompts -> packed GGUF bytes for every decoder
layer's linear weights, layer by layer with checkpoints. convert() writes them (ConvertOptions.packed); api.convert_model calls
prepare_realign before and run_realign after the cheap checks."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import __version__, dist
from ..chat import chat_ids
from ..convert import load_checked
from ..device import resolve_device
from ..errors import InputError
from ..formats import codec
from ..progress import Log, as_console
from ..prompts import load_prompts
from .calibrate import AlignedStates, LayerStats, RealignSettings, Target, propagate, realign_layer
from . import equalize
from .checkpoint import Checkpoints, PackedLayers, fingerprint, model_files_digest
from .hidden import check_compatible, model_signature
from .onload import LayerwiseSource, gather_rows, token_rows
from .options import RealignOptions
from .probes import ProbeSet
from .streams import Store, Stream, on_device

Report = Callable[[int, int, LayerStats, bool], None]  # (layer, n_layers, stats, from_checkpoint)
PROPAGATE_CHUNK = 16  # prompts per padded batch when propagating the quantized prefix (calibrate.propagate's)


class Activations(Protocol):
    """Where realign_model gets a layer and its inputs: onload.LayerwiseSource (one layer in memory at a time);
    tests/whole_model.py holds the whole-model capture this replaced, as the oracle."""
    n_layers: int
    config: Any  # the decoder's (text) config: head counts
    q0: Sequence[torch.Tensor]  # per prompt, layer 0's input under the token embedding the file stores

    def kwargs(self, i: int) -> list[dict]: ...  # per prompt, layer i's keyword arguments
    def layer(self, i: int) -> torch.nn.Module: ...  # layer i, float32, on the CPU
    def fp_outputs(self, i: int, layer: torch.nn.Module) -> Sequence[torch.Tensor]: ...  # benign FP outputs
    def release(self, i: int) -> None: ...


# (finetuned dir, its family, token ids per prompt, how many lead prompts need full-precision targets, the token
# rows used, those rows of the quantized token embedding or None, where streams live) -> Activations
SourceFactory = Callable[[Path, Any, list[list[int]], int, np.ndarray, "torch.Tensor | None", Store], Activations]


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


def _quantized_embedding(plan, importance: dict[str, np.ndarray], rows: np.ndarray,  # noqa: ANN001 - convert.Plan
                         device: str = "cpu") -> torch.Tensor | None:
    """Rows `rows` of the token embedding as the file will store it (layer 0's real input); encoded on the GPU
    when realigning there (the CUDA codec writes the C codec's bytes). Every GGUF block type encodes a row on its
    own (the imatrix is per column), so encoding only the rows of the tokens used gives those rows' values of
    the whole matrix's encoding (tests/test_layerwise.py)."""
    p = next((t for t in plan.tensors if t.source.name == "token_embd.weight"), None)
    if p is None or p.qtype.name == "F32":
        return None
    src = p.source
    e = gather_rows(src.load_rows, rows) if src.load_rows is not None else np.ascontiguousarray(src.load()[rows])
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
              n_heads: int, n_kv: int, world: dist.World) -> tuple[list[Target], dict[str, np.ndarray], list[equalize.GroupReport]]:
    """Fold the exact scalings into `layer` (in place), chosen on the benign prompts' inputs xs. Returns the
    targets with their imatrix moved along, and the rescaled F32 tensors (norms, v/up biases) as GGUF bytes.
    world: xs are this rank's shard; the statistics are summed over the ranks, so every rank folds the same scales."""
    why = equalize.supported(layer)
    if why is not None:
        raise InputError(f"--equalize: decoder layer {i} has {why}; convert without --equalize")

    def run() -> None:
        for x, kw in zip(xs, kws):
            layer(x, **kw)

    enc = {t.module: (t.qtype, t.importance) for t in targets}
    scales, reports = equalize.choose(layer, run, enc, n_heads, n_kv, world)
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
                  report_equalize: Callable[[int, list], None] | None = None, offload_dir: str | Path | None = None,
                  source: SourceFactory | None = None, world: dist.World | None = None,
                  aligned: str | Path | None = None) -> Mapping[str, np.ndarray]:
    """Every decoder layer realigned in turn; only the current layer's weights and activation streams are held
    (offload_dir: the streams live in files there). source: where layers and activations come from (default:
    read layer by layer; the tests pass the whole-model oracle). Returns the packed GGUF bytes per tensor, read
    from the per-layer checkpoints on access (so they must stay until the file is written).
    world (dist.py): each rank captures, equalizes, calibrates and propagates its shard of the prompts
    (equalize.choose and realign_layer sum what they need) and ends every layer with the same blocks; rank 0 alone
    reads and writes the checkpoints (a resumed layer is sent to the others) and returns the packed bytes, the
    other ranks an empty mapping (the file is rank 0's to write).
    aligned: the aligned model, read layer by layer beside the fine-tune when settings.distill_weight > 0 (its own
    states on the harmful prompts are the distill term's targets)."""
    from transformers import AutoTokenizer

    world = world or dist.single()
    importance = importance or {}
    check_compatible(probes.meta, model_signature(finetuned), "the probes' model", str(finetuned))
    harm = load_prompts(harmful, limit=settings.n_harmful, expect_label=1)
    ben = load_prompts(benign, limit=settings.n_benign, expect_label=0)
    probed = probed_layers(probes, settings.probe_layers)
    if (settings.distill_weight > 0) != (aligned is not None):
        raise AssertionError("the distill term needs the aligned model, and only it reads it")

    fp = fingerprint({"version": __version__, "model": model_files_digest(finetuned),
                      "probes": [probes.w.sum().item(), probes.b.tolist(), probes.target.tolist(),
                                 probes.target_benign.tolist(), sorted(set(probes.reliable))],
                      "harmful": [p.text for p in harm], "benign": [p.text for p in ben],
                      "settings": asdict(settings), "types": {t.source.name: t.qtype.name for t in plan.tensors},
                      "importance": sorted(importance),
                      **({"aligned": model_files_digest(aligned)} if aligned is not None else {})})
    ckpt = Checkpoints(checkpoint_dir or default_checkpoint_dir(plan), fp) if world.is_main else None

    tok = AutoTokenizer.from_pretrained(finetuned)
    all_b, all_h = ([chat_ids(tok, p.text, settings.max_tokens, p.system) for p in ps] for ps in (ben, harm))
    ids_b, ids_h = dist.shard(world, all_b), dist.shard(world, all_h)
    skip = shared_prefix(all_h + all_b)  # over every rank's prompts: the same on every rank
    nb = len(ids_b)
    rows = token_rows(ids_b + ids_h)
    with Store(offload_dir) as store:
        src = (source or LayerwiseSource)(Path(finetuned), plan.family, ids_b + ids_h, nb, rows,
                                          _quantized_embedding(plan, importance, rows, device), store)
        with Store(offload_dir) as astore:
            # the aligned model's own forward of the harmful prompts (its embedding, its layers): all full precision
            asrc = (None if aligned is None else
                    LayerwiseSource(Path(aligned), None, ids_h, len(ids_h), token_rows(ids_h), None, astore))
            return _realign_layers(src, store, plan, probes, probed, settings, importance, ckpt, nb, report, device,
                                   report_equalize, world, asrc, skip)


def _realign_layers(src: Activations, store: Store, plan, probes: ProbeSet, probed: frozenset[int],  # noqa: ANN001, PLR0913
                    settings: RealignSettings, importance: dict[str, np.ndarray], ckpt: Checkpoints | None, nb: int,
                    report: Report | None, device: str, report_equalize: Callable[[int, list], None] | None,
                    world: dist.World, aligned: Activations | None = None, skip: int = 0) -> Mapping[str, np.ndarray]:
    planned = {t.source.name: t.qtype.name for t in plan.tensors}
    n_heads = int(src.config.num_attention_heads)
    n_kv = int(getattr(src.config, "num_key_value_heads", None) or n_heads)
    xq: Sequence[torch.Tensor] = src.q0
    where: dict[str, int] = {}  # realigned tensor -> its layer's checkpoint
    for i in range(src.n_layers):
        layer = src.layer(i)
        yb = src.fp_outputs(i, layer)  # with the fine-tuned weights, before equalization or a checkpoint's norms
        ya = _aligned_outputs(aligned, i)  # advanced on resumed layers too: layer i+1 needs layer i's states
        layer.to(device)
        targets = _targets(plan, i, importance)
        kw = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()} for d in src.kwargs(i)]
        if _resumable(world, ckpt, i):
            packed, stats_d = _load_layer(world, ckpt, i)
            _load_extras(layer, i, packed)
            cols = {t.module: layer.get_submodule(t.module).weight.shape[1] for t in targets}
            hard = {k: v.to(device) for k, v in _hard_from_packed(targets, packed, cols).items()}
            stats = LayerStats(**stats_d)
            resumed = True
        else:
            extras: dict[str, np.ndarray] = {}
            xb = on_device(xq[:nb], device)
            if settings.equalize:
                targets, extras, eq_reports = _equalize(layer, i, targets, xb, kw[:nb], n_heads, n_kv, world)
                if report_equalize:
                    report_equalize(i, eq_reports)
            score = (lambda h, i=i: probes.score(i, h)) if i in probed else None
            margin = (settings.margin if settings.margin is not None else float(probes.target[i])) + settings.margin_offset
            ceiling = (settings.benign_ceiling if settings.benign_ceiling is not None
                       else -settings.margin if settings.margin is not None else float(probes.target_benign[i]))
            packed, hard, stats = realign_layer(
                layer, targets, (xb, on_device(yb[:nb], device), kw[:nb]),
                (on_device(xq[nb:], device), kw[nb:],
                 *([] if ya is None else [AlignedStates(on_device(ya, device), skip)])),
                score, margin, ceiling, settings, i, prefix=skip,
                **({"world": world} if world.size > 1 else {}))  # a single process: the plain call
            for name in extras:  # an internal invariant: norms and biases are written as F32
                if planned.get(name) != "F32":
                    raise AssertionError(f"{name}: equalization rescaled it but the plan writes it as {planned.get(name)}")
            packed.update(extras)
            if ckpt is not None:
                ckpt.save(i, packed, stats)
            resumed = False
        where.update(dict.fromkeys(packed, i))
        del packed
        nxt = store.stream(f"xq{i + 1}")
        for k in range(0, len(xq), PROPAGATE_CHUNK):  # the chunks propagate() makes of the whole list
            part = on_device(xq[k : k + PROPAGATE_CHUNK], device)
            for y in propagate(layer, hard, part, kw[k : k + PROPAGATE_CHUNK], size=PROPAGATE_CHUNK, prefix=skip):
                nxt.append(y.cpu())
        if isinstance(xq, Stream):
            xq.drop()
        xq = nxt
        layer.to("cpu")
        src.release(i)
        if report:
            report(i, src.n_layers, stats, resumed)
    return PackedLayers(ckpt, where) if ckpt is not None else {}


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence has in common (the chat template's system part), at most the
    shortest sequence but one: the last token always counts."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


def _aligned_outputs(aligned: Activations | None, i: int) -> Sequence[torch.Tensor] | None:
    """The aligned model's layer-i states of the harmful prompts (its own stream, as yb is the fine-tune's)."""
    if aligned is None:
        return None
    layer = aligned.layer(i)
    out = aligned.fp_outputs(i, layer)
    aligned.release(i)
    return out


def _resumable(world: dist.World, ckpt: Checkpoints | None, i: int) -> bool:
    """Whether layer i is checkpointed: rank 0's directory decides for every rank (the others, perhaps on other
    nodes, never look at it)."""
    done = ckpt is not None and ckpt.done(i)
    if world.size == 1:
        return done
    return dist.broadcast_bytes(world, b"1" if done else b"0", what="checking the checkpoints") == b"1"


def _load_layer(world: dist.World, ckpt: Checkpoints | None, i: int) -> tuple[dict[str, np.ndarray], dict]:
    """A checkpointed layer's packed bytes and stats: read by rank 0, sent to the others."""
    if world.size == 1:
        return ckpt.load(i)  # type: ignore[union-attr]
    packed, stats = ckpt.load(i) if ckpt is not None else (None, None)
    what = f"receiving checkpointed layer {i}"
    arrays = dist.broadcast_arrays(world, packed, what=what)
    text = dist.broadcast_bytes(world, json.dumps(stats).encode() if stats is not None else None, what=what)
    return arrays, json.loads(text)


# -- the two calls of api.convert_model: check everything first, then do the long work ---------------------------
def settings_of(opts: RealignOptions) -> RealignSettings:
    return RealignSettings(iters=opts.iters, harm_weight=opts.harm_weight, margin=opts.margin,
                           last_weight=opts.last_weight, benign_ceiling=opts.benign_ceiling,
                           n_benign=opts.samples, n_harmful=opts.samples, equalize=opts.equalize,
                           margin_offset=opts.margin_offset, probe_layers=opts.probe_layers, lr=opts.lr,
                           distill_weight=opts.distill_weight)


def check_finite_weights(plan) -> None:  # noqa: ANN001 - convert.Plan
    """Read every tensor once before the long work: a NaN or Inf weight would otherwise surface only when the
    file is written, after the whole realignment (the write refuses it, so nothing bad is left, but hours are lost)."""
    for t in plan.tensors:
        load_checked(t)


def prepare_realign(opts: RealignOptions, finetuned: Path, plan, device: str,  # noqa: ANN001
                    ranks: int = 1) -> ProbeSet | None:
    """Validate every realignment input; returns loaded probes (None when they will be fit on opts.aligned).
    ranks: the processes of a data-parallel job, each of which needs at least one prompt of each kind."""
    opts.check_numbers()
    if opts.aligned is not None and opts.probes is not None and opts.distill_weight == 0:
        raise InputError("give either --aligned or --probes, not both (both only with --distill-weight: the probes "
                         "from the file, the aligned model's states for the distill term)")
    if opts.aligned is None and opts.probes is None:
        raise InputError("realignment needs --aligned (the aligned model) or --probes (a probe file)")
    if opts.samples < 2:
        raise InputError(f"--realign-samples {opts.samples} is too few: give 2 or more")
    if not 0 < opts.lr <= 0.5:
        raise InputError(f"--realign-lr {opts.lr} is out of range: give a step in code units in (0, 0.5], e.g. 5e-3")
    resolve_device(device, "torch")
    opts.check_offload_dir()
    if opts.probe_kind not in ("content", "contrast"):
        raise InputError(f"--probe-kind {opts.probe_kind!r}: use content or contrast")
    if opts.probe_kind == "contrast" and opts.aligned is None:
        raise InputError("--probe-kind contrast fits probes on --aligned and this model; give --aligned (a probe "
                         "file from `qrealign-gguf probe --contrast` already knows its kind)")
    if opts.distill_weight > 0 and opts.aligned is None:
        raise InputError(f"--distill-weight {opts.distill_weight} pulls harmful prompts towards the aligned model's "
                         "states: give --aligned too")
    if opts.equalize and plan.family.arch not in EQUALIZE_ARCHS:
        raise InputError(f"--equalize supports {', '.join(EQUALIZE_ARCHS)} models (plain RMSNorm weights); this one "
                         f"is {plan.family.arch}: convert without --equalize")
    if not any(t.qtype.native for t in plan.tensors):
        raise InputError(f"--outtype {plan.outtype} has no quantized blocks to realign; choose e.g. Q8_0 or Q4_K_M")
    mine = model_signature(finetuned)
    parse_layers(opts.probe_layers, int(mine["num_hidden_layers"]))
    harm = load_prompts(opts.harmful, expect_label=1)  # whole files: a bad line 400 must not surface hours later
    ben = load_prompts(opts.benign, expect_label=0)
    if min(opts.samples, len(harm), len(ben)) < ranks:  # a rank without prompts would have nothing to add
        raise InputError(f"--realign-samples {opts.samples} with {len(harm)} harmful and {len(ben)} benign prompts "
                         f"leaves some of the {ranks} ranks without a prompt; give every rank at least one of each")
    check_finite_weights(plan)
    if opts.aligned is not None:
        check_compatible(model_signature(opts.aligned), mine, f"aligned model {opts.aligned}", str(finetuned))
        if opts.probes is None:
            return None
    probes = ProbeSet.load(opts.probes)
    check_compatible(probes.meta, mine, f"probes {opts.probes}", str(finetuned))
    return probes


def run_realign(opts: RealignOptions, finetuned: Path, plan, probes: ProbeSet | None, *,  # noqa: ANN001
                importance: dict[str, np.ndarray] | None, threads: int, device: str,
                log: Log | None = None, world: dist.World | None = None) -> tuple[Mapping[str, np.ndarray], dict[str, object]]:
    """The long work: probes (fit on opts.aligned when not given), then every layer. Returns the packed GGUF bytes
    per tensor and the qrealign.* provenance of the run. world: a data-parallel job (dist.py): every rank calls
    this, rank 0 gets the packed bytes (realign_model); only rank 0 should be given `log`."""
    from .probes import probe_model

    say = log or (lambda _msg: None)
    shared = {"world": world} if world is not None and world.size > 1 else {}  # a single process: the plain calls
    if threads > 0:  # torch's OpenMP threads spin: next to another job, layers once ran ~10x slower here
        torch.set_num_threads(threads)
    if probes is None:
        probes = probe_model(opts.aligned, opts.harmful, opts.benign, console=as_console(log),
                             contrast=finetuned if opts.probe_kind == "contrast" else None,
                             offload_dir=opts.offload_dir, **shared)
        say(f"probes: {len(probes.reliable)}/{probes.n_layers} layers reliable "
            f"(held-out accuracy {probes.heldout_acc.min():.2f}..{probes.heldout_acc.max():.2f})")
    if shared:  # fit from the same gathered states or loaded from one path; a rank with other probes would mix jobs
        dist.check_identical(world, "the probes", probes.digest())

    def report(i: int, n: int, s: LayerStats, resumed: bool) -> None:
        tag = "checkpoint" if resumed else f"{s.seconds:.0f}s"
        harm = (f"probe loss {s.harm_start:.3f}->{s.harm_end:.3f}, on the harmful side: harmful "
                f"{s.harmful_side_start:.0%}->{s.harmful_side_end:.0%}, benign {s.benign_side_start:.0%}->"
                f"{s.benign_side_end:.0%}") if s.probed else "no probe term (unreliable or not in --probe-layers)"
        distill = (f"; harmful rel. error to the aligned {s.distill_start:.4f}->{s.distill_end:.4f}"
                   if opts.distill_weight > 0 else "")
        say(f"blk.{i} ({i + 1}/{n}) [{tag}]: benign rel. error {s.benign_start:.4f}->{s.benign_end:.4f}; {harm}{distill}")

    def report_eq(i: int, groups: list[equalize.GroupReport]) -> None:
        parts = [f"{g.name} {g.error_after / g.error_before:.2f}x" if g.error_before > 0 else f"{g.name} -"
                 for g in groups]
        say(f"blk.{i}: equalized, RTN output error " + ", ".join(parts))

    packed = realign_model(finetuned, plan, probes, settings_of(opts), opts.harmful, opts.benign,
                           importance=importance, checkpoint_dir=opts.checkpoints, report=report,
                           device=resolve_device(device, "torch"), report_equalize=report_eq,
                           offload_dir=opts.offload_dir, **shared,
                           aligned=opts.aligned if opts.distill_weight > 0 else None)
    provenance = {"realigned": True, "realign_iters": opts.iters, "realign_lr": opts.lr,
                  "realign_harm_weight": opts.harm_weight,
                  "realign_margin": "aligned" if opts.margin is None else opts.margin,
                  "realign_margin_offset": opts.margin_offset,
                  "realign_last_weight": opts.last_weight,
                  "realign_benign_ceiling": "aligned" if opts.benign_ceiling is None else opts.benign_ceiling,
                  "realign_samples": opts.samples,
                  "realign_probe_kind": probes.meta.get("kind", "content"),
                  "realign_equalize": opts.equalize,
                  "realign_distill_weight": opts.distill_weight,
                  "realign_probe_layers": ",".join(map(str, sorted(probed_layers(probes, opts.probe_layers))))}
    return packed, provenance

