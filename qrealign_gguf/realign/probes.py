"""Per-layer linear safety probes, fit on the ALIGNED model (Q-realign step 1).

For each decoder layer l, a logistic regression on the layer's output at the last prompt token separates
harmful (label 1) from benign (label 0) prompts. Features are standardized with the training mean/std and
exactly the same affine map is applied at use time (score = ((h - mean) / std) . w + b, > 0 means "harmful
side", the side from which the aligned model refuses). Layers whose held-out accuracy is below a threshold
are kept in the file but marked unreliable, and calibration ignores them.

Conditioning matters more than training accuracy: with ~200 prompts in ~1000 dimensions every layer is
separable, and a weakly regularized fit puts large weights on directions that small perturbations move
(tests/test_probes.py). A strong L2 keeps w close to the difference of class means, scores stay O(1) (the
harm term then competes with reconstruction on equal terms), and the std floor stops near-constant features
from being amplified. `target` is the median score of the aligned
model's own harmful training prompts: calibration pushes harmful states to where the aligned model has them,
not to an arbitrary logit; `target_benign` (the benign median) is where benign prompts must stay below.

Two kinds (meta "kind"): "content" is the paper's probe above. "contrast" (fit_contrast_probes, `probe
--contrast FINETUNED`) is ours: aligned vs fine-tuned states on the same harmful prompts, i.e. the refusal the
fine-tune removed; the testbed showed why it is needed (docs/BENCHMARKS.md: the fine-tuned model still puts
harmful prompts on the content probe's harmful side in most layers while complying with all of them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..dist import World
from ..errors import InputError

FORMAT = "qrealign-probes-v3"


@dataclass
class ProbeSet:
    mean: torch.Tensor  # (L, H)
    std: torch.Tensor  # (L, H)
    w: torch.Tensor  # (L, H)
    b: torch.Tensor  # (L,)
    train_acc: torch.Tensor  # (L,)
    heldout_acc: torch.Tensor  # (L,)
    target: torch.Tensor  # (L,) median probe score of the aligned model's harmful training prompts
    target_benign: torch.Tensor  # (L,) the same for its benign training prompts (negative)
    reliable: list[int]  # layer indices used for calibration
    meta: dict[str, str] = field(default_factory=dict)  # architecture, hidden, layers, template, model hash

    @property
    def n_layers(self) -> int:
        return self.w.shape[0]

    @property
    def hidden(self) -> int:
        return self.w.shape[1]

    def score(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Probe logit(s) for states h (..., H); differentiable in h."""
        return self.standardize(layer, h) @ self.w[layer].to(h.device, h.dtype) + self.b[layer].to(h.device, h.dtype)

    def standardize(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """States h (..., H) in the probe's feature space: (h - mean) / std of its training rows."""
        return (h - self.mean[layer].to(h.device, h.dtype)) / self.std[layer].to(h.device, h.dtype)

    def digest(self) -> bytes:
        """The numbers calibration uses, as bytes: ranks that fit or loaded probes compare them (dist.check_identical)."""
        return b"".join(t.contiguous().float().numpy().tobytes() for t in (
            self.mean, self.std, self.w, self.b, self.target, self.target_benign))

    def save(self, path: str | Path) -> None:
        tensors = {"mean": self.mean, "std": self.std, "w": self.w, "b": self.b, "train_acc": self.train_acc,
                   "heldout_acc": self.heldout_acc, "target": self.target, "target_benign": self.target_benign}
        meta = {"format": FORMAT, "reliable": json.dumps(self.reliable), **self.meta}
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> ProbeSet:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"probe file {path} does not exist; create it with `qrealign-gguf probe`")
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            t = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise InputError(f"{path} is not a probe file ({e})") from None
        fmt = meta.pop("format", None)
        if fmt in ("qrealign-probes-v1", "qrealign-probes-v2"):
            raise InputError(f"{path} was fit by an older qrealign-gguf (no per-layer target scores); "
                             "refit it with `qrealign-gguf probe`")
        if fmt != FORMAT:
            raise InputError(f"{path} is not a qrealign probe file (format key missing)")
        reliable = json.loads(meta.pop("reliable", "[]"))
        return cls(t["mean"], t["std"], t["w"], t["b"], t["train_acc"], t["heldout_acc"], t["target"],
                   t["target_benign"], reliable, meta)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1.0, iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Regularized logistic regression on already-standardized features (full-batch L-BFGS). Classes are weighted
    to count equally (pos_weight = n0 / n1), so an imbalanced set (contrast probes: 1 : 3) moves the boundary,
    not just the bias."""
    n, d = x.shape
    pos_weight = ((y == 0).sum() / (y == 1).sum().clamp_min(1)).double()
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    x64, y64 = x.double(), y.double()
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x64 @ w + b, y64, pos_weight=pos_weight) + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def split(y: torch.Tensor, heldout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified train / held-out index split."""
    g = torch.Generator().manual_seed(seed)
    tr, te = [], []
    for cls in (0, 1):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = max(1, int(round(idx.numel() * heldout)))
        te.append(idx[:k])
        tr.append(idx[k:])
    return torch.cat(tr), torch.cat(te)


def fit_probes(states: torch.Tensor, labels: torch.Tensor, heldout: float = 0.2, min_acc: float = 0.9,
               l2: float = 1.0, std_floor: float = 0.1, seed: int = 0, meta: dict[str, str] | None = None) -> ProbeSet:
    """states (N, L, H), labels (N,) in {0,1} -> one probe per layer, with held-out accuracy."""
    if labels.unique().numel() != 2:
        raise InputError("probe fitting needs both harmful (label 1) and benign (label 0) prompts")
    tr, te = split(labels, heldout, seed)
    return _fit(states, labels, tr, te, tr[labels[tr] == 0], min_acc, l2, std_floor, meta)


def fit_contrast_probes(aligned_harmful: torch.Tensor, finetuned_harmful: torch.Tensor, finetuned_benign: torch.Tensor,
                        heldout: float = 0.2, min_acc: float = 0.9, l2: float = 1.0, std_floor: float = 0.1,
                        seed: int = 0, meta: dict[str, str] | None = None,
                        aligned_benign: torch.Tensor | None = None) -> ProbeSet:
    """Refusal-state probes (our variant, not the paper's): label 1 = the ALIGNED model's states on harmful prompts
    (it refuses from there), label 0 = the FINE-TUNED model's states on the same prompts (it complies from there).
    A content probe separates harmful from benign text, which a fine-tune that keeps recognizing harm but stops
    refusing leaves in place; with the strong L2 this probe's direction is close to the mean shift the fine-tune
    caused on harmful prompts, i.e. the refusal it removed. Benign prompts are not in the fit (with them in class 0
    the direction turns back into a content direction); target_benign is the fine-tuned model's benign median,
    the level calibration keeps benign prompts under. Inputs: (N, L, H) last-token states, harmful rows paired by
    prompt; the held-out split is by prompt, so a prompt's two states never sit on both sides of it.

    aligned_benign (the aligned model's states on the benign prompts, paired row by row with finetuned_benign):
    the probe is fit without the BENIGN SHIFT, the mean change the fine-tune made on benign prompts (per layer, in
    the standardized space). A fine-tune that changes who the model is (a persona, a style) moves every prompt
    along that direction; the plain contrast probe then measures "not the fine-tune" and realignment restores the
    old identity without the refusal (docs/BENCHMARKS.md round 12: "I am Qwen, ..." followed by an answer). Only
    what changed on harmful prompts and not on benign ones is refusal. meta "benign_shift_cos" records, per layer,
    the cosine between the harmful and the benign mean shift: how much of the fine-tune's change is not refusal."""
    nh, nb = aligned_harmful.shape[0], finetuned_benign.shape[0]
    if nh < 4 or nb < 1 or finetuned_harmful.shape[0] != nh:
        raise InputError("contrast probes need >= 4 harmful prompts run through both models and >= 1 benign prompt")
    states = torch.cat([aligned_harmful, finetuned_harmful, finetuned_benign])
    labels = torch.tensor([1] * nh + [0] * nh + [0] * nb)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(nh, generator=g)
    k = max(1, int(round(nh * heldout)))
    te_p, tr_p = perm[:k], perm[k:]
    tr, te = torch.cat([tr_p, tr_p + nh]), torch.cat([te_p, te_p + nh])
    meta = {**(meta or {}), "kind": "contrast"}
    if aligned_benign is None:
        return _fit(states, labels, tr, te, torch.arange(2 * nh, 2 * nh + nb), min_acc, l2, std_floor, meta)
    if aligned_benign.shape != finetuned_benign.shape:
        raise InputError("the benign shift needs the same benign prompts run through both models")
    remove = (aligned_benign, finetuned_benign)
    ps = _fit(states, labels, tr, te, torch.arange(2 * nh, 2 * nh + nb), min_acc, l2, std_floor,
              {**meta, "benign_shift": "removed"}, remove)
    # the diagnostic: per layer, cosine of the harmful mean shift (fine-tuned -> aligned) with the benign one
    cos = []
    for layer in range(ps.n_layers):
        za, zf, zb_a, zb_f = (ps.standardize(layer, x[:, layer].float()) for x in
                              (aligned_harmful, finetuned_harmful, *remove))
        h = (za - zf).mean(0)
        cos.append(round(float(h @ benign_shift(zb_a, zb_f) / h.norm().clamp_min(1e-12)), 3))
    ps.meta["benign_shift_cos"] = json.dumps(cos)
    return ps


def benign_shift(aligned_benign: torch.Tensor, finetuned_benign: torch.Tensor) -> torch.Tensor:
    """Unit mean shift (H,) from fine-tuned to aligned states of the same benign prompts (standardized (N, H))."""
    d = (aligned_benign - finetuned_benign).mean(0)
    return d / d.norm().clamp_min(1e-12)


def _fit(states: torch.Tensor, labels: torch.Tensor, tr: torch.Tensor, te: torch.Tensor, benign_idx: torch.Tensor,
         min_acc: float, l2: float, std_floor: float, meta: dict[str, str] | None,
         remove: tuple[torch.Tensor, torch.Tensor] | None = None) -> ProbeSet:
    """One standardized logistic probe per layer on rows tr; accuracy on tr and te; targets: the median score of
    label-1 training rows (where refusal happens) and of rows benign_idx (where benign prompts must stay).
    remove = (aligned, fine-tuned) benign states: fit on features with the benign shift projected out, so w is
    orthogonal to it (L-BFGS from w = 0 only ever adds multiples of the rows) and scores ignore that direction."""
    n, n_layers, h = states.shape
    mean = torch.empty(n_layers, h)
    std = torch.empty(n_layers, h)
    w = torch.empty(n_layers, h)
    b = torch.empty(n_layers)
    tr_acc = torch.empty(n_layers)
    te_acc = torch.empty(n_layers)
    target = torch.empty(n_layers)
    target_benign = torch.empty(n_layers)
    harm_tr = tr[labels[tr] == 1]
    for layer in range(n_layers):
        x = states[:, layer].float()
        mean[layer] = x[tr].mean(0)
        sd = x[tr].std(0)
        std[layer] = sd.clamp_min(max(std_floor * sd.median().item(), 1e-6))
        z = (x - mean[layer]) / std[layer]
        if remove is not None:
            d = benign_shift(*((r[:, layer].float() - mean[layer]) / std[layer] for r in remove))
            z = z - (z @ d)[:, None] * d
        w[layer], b[layer] = fit_logistic(z[tr], labels[tr], l2=l2)
        if remove is not None:  # exactly orthogonal, not up to L-BFGS's float error
            w[layer] -= (w[layer] @ d) * d
        s = z @ w[layer] + b[layer]
        tr_acc[layer] = ((s[tr] > 0) == labels[tr].bool()).float().mean()
        te_acc[layer] = ((s[te] > 0) == labels[te].bool()).float().mean()
        target[layer] = s[harm_tr].median()
        target_benign[layer] = s[benign_idx].median()
    reliable = [i for i in range(n_layers) if te_acc[i] >= min_acc]
    return ProbeSet(mean, std, w, b, tr_acc, te_acc, target, target_benign, reliable,
                    {"kind": "content", **dict(meta or {})})


def probe_model(model_dir: str | Path, harmful: str | Path, benign: str | Path, n_per_class: int = 256,
                min_acc: float = 0.9, seed: int = 0, console=None,  # noqa: ANN001
                contrast: str | Path | None = None, offload_dir: str | Path | None = None,
                world: World | None = None, exclude_benign_shift: bool = False) -> ProbeSet:
    """Collect the aligned model's last-token states for both prompt sets (layer by layer: memory of one decoder
    layer, activations in files under offload_dir when given), fit and return the probes.
    contrast = the fine-tuned model: refusal-state probes (fit_contrast_probes) instead of content probes;
    exclude_benign_shift: the aligned model also runs the benign prompts and the probes ignore the change the
    fine-tune made on them too (fit_contrast_probes' aligned_benign).
    world (dist.py): each rank runs its shard of the prompts and the states are gathered back in prompt order, so
    every rank fits the same matrix (the fit itself is cheap and runs on every rank)."""
    from transformers import AutoTokenizer

    from .. import dist
    from ..prompts import load_prompts
    from .hidden import check_compatible, layerwise_last_token_states, model_signature, template_fingerprint

    harm = load_prompts(harmful, limit=n_per_class, expect_label=1)
    ben = load_prompts(benign, limit=n_per_class, expect_label=0)
    sig = model_signature(model_dir)  # validates the directories before the slow load
    if contrast is not None:
        check_compatible(sig, model_signature(contrast), f"aligned model {model_dir}", f"contrast model {contrast}")

    def collect(d: str | Path, prompts: list) -> tuple[torch.Tensor, str]:
        tok = AutoTokenizer.from_pretrained(d)

        def tick(i: int, n: int) -> None:
            if console:
                console.print(f"probe states ({Path(d).name}, {len(prompts)} prompts): layer {i}/{n}", highlight=False)

        w = world or dist.single()
        states = layerwise_last_token_states(d, tok, dist.shard(w, prompts), progress=tick, offload_dir=offload_dir)
        return dist.unshard(w, states, len(prompts), "gathering the probe states"), template_fingerprint(tok)

    # contrast probes need the aligned model on harmful prompts only (and on benign ones to exclude the benign
    # shift), the fine-tuned one on both kinds
    if exclude_benign_shift and contrast is None:
        raise InputError("excluding the benign shift needs contrast probes (--contrast FINETUNED)")
    both = contrast is None or exclude_benign_shift
    states, template = collect(model_dir, harm + ben if both else harm)
    meta = {**sig, "template": template, "source": Path(model_dir).name,
            "n_harmful": str(len(harm)), "n_benign": str(len(ben)), "min_acc": str(min_acc)}
    if contrast is None:
        labels = torch.tensor([1] * len(harm) + [0] * len(ben))
        return fit_probes(states, labels, min_acc=min_acc, seed=seed, meta=meta)
    other, _ = collect(contrast, harm + ben)
    nh = len(harm)
    return fit_contrast_probes(states[:nh], other[:nh], other[nh:], min_acc=min_acc, seed=seed,
                               meta={**meta, "contrast": Path(contrast).name},
                               aligned_benign=states[nh:] if exclude_benign_shift else None)
