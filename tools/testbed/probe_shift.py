"""Where did fine-tuning move the harmful prompts, as seen by the aligned model's probes?

    .venv/bin/python -m tools.testbed.probe_shift --aligned A_DIR --finetuned F_DIR [--states DIR] [--n 96]
        [--kind content|contrast] [--save probes.safetensors]

Collects every decoder layer's last-prompt-token state (realign.hidden.last_token_states) of both models on the
calibration sets (probe training: first N of builtin:harmful / builtin:benign) and on the dev sets, fits probes
on the aligned model (realign.probes.fit_probes, the same fit `qrealign-gguf probe` uses, settings given below)
and prints per layer: held-out accuracy, the fraction of dev prompts on the probe's harmful side for each model,
and the median dev-harmful score. --kind contrast fits the refusal-state probes (aligned vs fine-tuned on the
harmful calibration prompts) instead; --save writes the probe file `convert --probes` takes, so the states are
collected once for diagnosis and realignment. States are cached in --states (they take ~15 min per model on 2 CPU cores).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tools import ROOT

DATA = ROOT.parent / "shared" / "data"
DEV = {"dev_harmful": "dev_harmful.jsonl", "dev_over": "dev_overrefusal.jsonl", "dev_benign": "dev_benign.jsonl"}


def states(model_dir: Path, cache: Path, n: int) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrealign_gguf.prompts import load_prompts
    from qrealign_gguf.realign.hidden import last_token_states

    f = cache / f"{model_dir.name}.pt"
    if f.is_file():
        return torch.load(f)
    sets = {"calib_harmful": load_prompts("builtin:harmful", limit=n), "calib_benign": load_prompts("builtin:benign", limit=n),
            **{k: load_prompts(DATA / v) for k, v in DEV.items()}}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {k: last_token_states(model, tok, v) for k, v in sets.items()}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, f)
    return out


def main() -> None:
    from qrealign_gguf.realign.hidden import model_signature, template_fingerprint
    from qrealign_gguf.realign.probes import fit_contrast_probes, fit_probes

    ap = argparse.ArgumentParser()
    ap.add_argument("--aligned", type=Path, required=True)
    ap.add_argument("--finetuned", type=Path, required=True)
    ap.add_argument("--states", type=Path, default=Path("out/probe_shift"))
    ap.add_argument("--n", type=int, default=96, help="calibration prompts per class for the probes")
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--std-floor", type=float, default=0.1)
    ap.add_argument("--kind", choices=["content", "contrast"], default="content",
                    help="content: the paper's probes (aligned, harmful vs benign); contrast: aligned vs fine-tuned on "
                         "harmful prompts (realign.probes.fit_contrast_probes)")
    ap.add_argument("--save", type=Path, help="also write the probes (for convert --probes)")
    a = ap.parse_args()
    A, F = states(a.aligned, a.states, a.n), states(a.finetuned, a.states, a.n)
    n = min(a.n, len(A["calib_harmful"]), len(A["calib_benign"]))
    meta = {**model_signature(a.aligned), "source": a.aligned.name, "n_harmful": str(n), "n_benign": str(n)}
    if a.kind == "content":
        x = torch.cat([A["calib_harmful"][:n], A["calib_benign"][:n]])
        p = fit_probes(x, torch.tensor([1] * n + [0] * n), l2=a.l2, std_floor=a.std_floor, meta=meta)
    else:
        p = fit_contrast_probes(A["calib_harmful"][:n], F["calib_harmful"][:n], F["calib_benign"][:n], l2=a.l2,
                                std_floor=a.std_floor, meta={**meta, "contrast": a.finetuned.name})
    if a.save:
        from transformers import AutoTokenizer
        p.meta["template"] = template_fingerprint(AutoTokenizer.from_pretrained(a.aligned))
        p.save(a.save)
    print(f"{a.kind} probes: l2={a.l2} std_floor={a.std_floor}, {n}+{n} calibration prompts; columns: fraction of dev "
          "prompts on the harmful (refusal) side (harmful / over-refusal / benign), median dev-harmful score")
    print(f"{'layer':>5} {'held-out':>8} {'target':>7} | {'aligned':^26} | {'fine-tuned':^26}")
    for layer in range(p.n_layers):
        cols = []
        for m in (A, F):
            side = [(p.score(layer, m[k][:, layer]) > 0).float().mean().item() for k in DEV]
            med = p.score(layer, m["dev_harmful"][:, layer]).median().item()
            cols.append(" ".join(f"{v:5.2f}" for v in side) + f" {med:8.2f}")
        print(f"{layer:5d} {p.heldout_acc[layer].item():8.3f} {p.target[layer].item():7.2f} | {cols[0]} | {cols[1]}")
    if a.save:
        print(f"wrote {a.save} ({len(p.reliable)}/{p.n_layers} layers reliable)")


if __name__ == "__main__":
    main()
