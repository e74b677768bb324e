"""Model-level check of a block design before anyone writes its kernels: KLD of a float model whose layer matrices
are replaced by their decoded blocks (real codec, or outlier_study.py's emulations), in torch.

    .venv/bin/python -m tools.studies.design_kld HF_DIR [--imatrix FILE.gguf] [--designs Q4_1,Q4_K/128,Q5_0,Q5_K/128]
        [--chunks 8] [--n-ctx 512]

Every 2-D weight inside the transformer layers whose rows are a multiple of 128 is swapped for its decoded
version of the design; embeddings, norms and the head stay float. KLD(float || design) per token, averaged over
`--chunks` chunks of the held-out text bench_type_quality.py uses (stdlib textwrap.py + shlex.py), and the paired
per-chunk difference to the first design. No llama.cpp involved: it ranks designs, it is not a runtime number.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from qrealign_gguf.imatrix import load_imatrix
from tools.bench.bench_type_quality import heldout_text
from tools.studies.outlier_study import _imatrix_for, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--designs", default="Q4_1,Q4_K/128,Q5_0,Q5_K/128")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    ids = tok(heldout_text(), return_tensors="pt").input_ids[0]
    chunks = [ids[i * a.n_ctx:(i + 1) * a.n_ctx] for i in range(min(a.chunks, len(ids) // a.n_ctx))]

    @torch.no_grad()
    def logprobs(c: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(c[None]).logits[0, :-1].float(), -1)

    ref = [logprobs(c) for c in chunks]  # float32: 8 chunks of a 150k vocab are ~2.5 GB
    imx = load_imatrix(a.imatrix) if a.imatrix else {}
    mats = {n: p for n, p in model.named_parameters()
            if ".layers." in n and n.endswith("proj.weight") and p.dim() == 2 and p.shape[1] % 128 == 0}
    orig = {n: p.detach().clone() for n, p in mats.items()}
    results: dict[str, list[float]] = {}
    for design in a.designs.split(","):
        with torch.no_grad():
            for n, p in mats.items():
                w = orig[n].numpy()
                p.copy_(torch.from_numpy(decode(np.ascontiguousarray(w), _imatrix_for(imx, n, w.shape[1]),
                                                 design)))
        kl = []
        for c, r in zip(chunks, ref):
            lp = logprobs(c)
            kl.append(float((r.exp() * (r - lp)).sum(-1).mean()))
        results[design] = kl
        print(f"{design:10} KLD {np.mean(kl):.5f}", flush=True)
    first = next(iter(results))
    print(f"\n{a.model.name}: {len(mats)} matrices replaced, {len(chunks)} x {a.n_ctx} tokens, torch float32")
    for d, kl in results.items():
        diff = np.array(kl) - np.array(results[first])
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        print(f"{d:10} KLD {np.mean(kl):.5f}   vs {first}: {diff.mean():+.5f} ± {se:.5f}")


if __name__ == "__main__":
    main()
