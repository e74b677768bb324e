"""Speed of qrealign's custom tensor types in the patched llama.cpp: llama-bench on the custom outtypes vs Q4_K_M.

    .venv/bin/python -m tools.bench.bench_custom_type --model DIR_OR_NAME [--types Q4_K_M,QR4_K_M,...]
        [--out out/bench_custom] [--threads 2] [--reps 3] [--before PREFIX] [--rounds 2]

Converts the model once per outtype with `qrealign-gguf convert` (reused when present), then runs the PATCHED
build's llama-bench on each file in the same run (prompt processing pp128 and decode tg32, CPU only) and prints
tokens/s with the ratio to the first type, plus each file's bits per weight and the share of weights that are
in a custom type (QR4_KO needs rows of 256*k, QR5_K128 rows of 128*odd: on a given model only some matrices are).
The patched build runs the standard types with stock code, so Q4_K_M / Q5_K_M are the fair peers.

--before PREFIX: a second llama.cpp install (e.g. the cached patched build of an earlier patch set,
~/.cache/qrealign-gguf/llama.cpp/0.3.36-patched-<key>) benched on the same files in the same run, interleaved
with the current build per type and round, so a kernel change is measured before/after under the same load.
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from qrealign_gguf import ConvertJob, convert_model
from qrealign_gguf.inspect import read_gguf_summary
from qrealign_gguf.llamacpp import LlamaBuild, find_llama
from tools import ROOT
from tools.data.fetch_model import model_dir

TYPES = "Q4_K_M,QR4_K_M,Q5_K_M,QR5_K_M,QR4_KO"


def bench(build, f: Path, threads: int, reps: int) -> dict[str, float]:  # noqa: ANN001 - LlamaBuild
    cmd = [str(build.bin("llama-bench")), "-m", str(f), "-p", "128", "-n", "32", "-r", str(reps), "-t", str(threads),
           "-o", "json"]
    res = subprocess.run(cmd, env=build.env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"llama-bench failed on {f.name}:\n{res.stderr[-2000:]}")
    rows = json.loads(res.stdout)
    out = {}
    for r in rows:
        kind = "pp128" if r.get("n_prompt", 0) else "tg32"
        out[kind] = float(r["avg_ts"])
        out[kind + "_sd"] = float(r.get("stddev_ts", 0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory, or a fetch_model.py name (e.g. qwen05)")
    ap.add_argument("--types", default=TYPES, help="outtypes, the first is the ratios' base")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_custom")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--before", type=Path, help="a second llama.cpp install prefix, benched in the same run")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole interleaved sweep")
    a = ap.parse_args()
    src = model_dir(a.model)
    a.out.mkdir(parents=True, exist_ok=True)
    current = find_llama("patched")
    builds = {"before": LlamaBuild(a.before, "patched"), "after": current} if a.before else {"": current}
    files, sizes, rows = {}, {}, {}
    for t in a.types.split(","):
        f = a.out / f"{src.name}-{t}.gguf"
        if not f.exists():
            convert_model(ConvertJob(model=src, output=f, outtype=t))
        s = read_gguf_summary(f)
        custom = sum(int(np.prod(r.shape)) for r in s.tensors if r.custom)
        files[t], sizes[t] = f, {"bpw": s.bits_per_weight, "custom_share": custom / max(s.n_params, 1)}
    for rnd in range(a.rounds):
        for t, f in files.items():
            for side, build in builds.items():
                key = f"{t} {side}".strip() + (f" r{rnd + 1}" if a.rounds > 1 else "")
                rows[key] = {**sizes[t], **bench(build, f, a.threads, a.reps)}
    base = next(iter(rows.values()))
    print(f"{src.name}, patched llama.cpp llama-bench, {a.threads} threads, {a.reps} reps"
          + (f"; before = {a.before}" if a.before else ""))
    print(f"{'file / build':22} {'bpw':>6} {'custom share':>12} {'pp128 t/s':>12} {'ratio':>6} {'tg32 t/s':>10} {'ratio':>6}")
    for t, r in rows.items():
        print(f"{t:22} {r['bpw']:6.3f} {r['custom_share']:12.1%} {r['pp128']:8.1f}±{r['pp128_sd']:<4.1f}"
              f"{r['pp128'] / base['pp128']:6.2f} {r['tg32']:7.1f}±{r['tg32_sd']:<3.1f}{r['tg32'] / base['tg32']:6.2f}")
    if a.json:
        a.json.write_text(json.dumps({"model": str(src), "threads": a.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
