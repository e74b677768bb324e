"""How far a fine-tune's hidden states are from the aligned model's, per layer, on the calibration prompts.

    .venv/bin/python -m tools.studies.state_gap --aligned A_DIR --finetuned F_DIR [--samples 16] [--json out.json]

Each model runs its own forward (full precision) on the same chat-formatted prompts; per decoder layer the
relative squared error ||h_ft - h_al||^2 / ||h_al||^2, pooled over the prompts, on two position sets:
  after-prefix   every token from the user's text on (the template's system part, the same in every prompt, left out)
  last           the last prompt token (where the first answer token is decided)
for the builtin harmful and benign calibration prompts. This is the size `convert --distill-weight` starts from
(plus quantization error), so it is what the weight is chosen against (docs/BENCHMARKS.md round 13). Note that
transformers applies the final norm to the last entry of hidden_states, so the last layer's number is post-norm.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def state_gap(aligned: Path, finetuned: Path, samples: int = 16) -> dict[str, dict[str, list[float]]]:
    """{kind: {"after-prefix": per-layer gap, "last": per-layer gap}} for kind in harmful, benign."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrealign_gguf.chat import chat_ids
    from qrealign_gguf.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(finetuned)
    models = [AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval() for m in (aligned, finetuned)]
    out: dict[str, dict[str, list[float]]] = {}
    for kind, src, label in (("harmful", "builtin:harmful", 1), ("benign", "builtin:benign", 0)):
        num: dict[str, torch.Tensor] = {}
        den: dict[str, torch.Tensor] = {}
        for p in load_prompts(src, limit=samples, expect_label=label):
            ids = torch.tensor([chat_ids(tok, p.text, 128, p.system)])
            # the user's text starts where an empty message's template ends, less its closing 5 tokens
            # (<|im_end|>, newline, <|im_start|>, assistant, newline in ChatML)
            start = len(chat_ids(tok, "", 128, p.system)) - 5
            with torch.no_grad():
                ha, hf = (torch.stack(m(ids, output_hidden_states=True).hidden_states[1:])[:, 0] for m in models)
            for k, (a, f) in {"after-prefix": (ha[:, start:], hf[:, start:]), "last": (ha[:, -1:], hf[:, -1:])}.items():
                n, d = ((f - a) ** 2).sum((1, 2)), (a**2).sum((1, 2))
                num[k] = n if k not in num else num[k] + n
                den[k] = d if k not in den else den[k] + d
        out[kind] = {k: (num[k] / den[k]).tolist() for k in num}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aligned", type=Path, required=True)
    ap.add_argument("--finetuned", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    gaps = state_gap(a.aligned, a.finetuned, a.samples)
    for kind, g in gaps.items():
        for k, v in g.items():
            print(f"{kind:8s} {k:13s} " + " ".join(f"{x:.4f}" for x in v))
    if a.json:
        a.json.write_text(json.dumps(gaps, indent=1))


if __name__ == "__main__":
    main()
