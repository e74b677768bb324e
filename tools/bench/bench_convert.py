"""Whole-model conversion: qrealign-gguf vs upstream convert_hf_to_gguf.py + llama-quantize (same sdist).

For each output type: wall time and peak RSS of both pipelines (each step a separate process, RSS from
wait4's rusage), then perplexity and KL divergence of both files on the same benign text with the pinned
llama-perplexity, against the upstream F16 conversion's logits.

    .venv/bin/python -m tools.bench.bench_convert --model qwen05 --types Q8_0 Q4_K_M [--json out.json]

--speed-only skips the quality part (wall and peak RSS only; docs/BENCHMARKS.md "Plain conversion without torch"):

    .venv/bin/python -m tools.bench.bench_convert --model smollm2 --types Q8_0 Q4_K_M --speed-only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qrealign_gguf.llamacpp import find_llama
from tools import ROOT
from tools.data.fetch_model import fetch_hf

SHARED = ROOT.parent / "shared" / "data"


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    with tempfile.TemporaryFile("w+") as log:  # not a pipe: a child that logs more than a pipe holds would block
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        log.seek(0)
        err = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{err[-3000:]}")
    return wall, ru.ru_maxrss / 1024


def benign_text(path: Path) -> Path:
    """Benign prose for perplexity: the alpaca dev + calibration prompts (no labels, no harmful text)."""
    rows = []
    for f in ("dev_benign.jsonl", "calib_benign.jsonl"):
        rows += [json.loads(line)["prompt"] for line in (SHARED / f).read_text().splitlines() if line.strip()]
    path.write_text("\n\n".join(rows))
    return path


def perplexity(llama, model: Path, text: Path, base: Path, ctx: int) -> dict[str, float]:
    r = subprocess.run([str(llama.bin("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
                        "--kl-divergence-base", str(base), "--kl-divergence", "-t", str(os.cpu_count())],
                       env=llama.env(), capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(out[-3000:])
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out)
    kld = re.search(r"Mean\s+KLD:\s*([\d.eE+-]+)", out)
    return {"ppl": float(ppl.group(1)) if ppl else float("nan"), "kld": float(kld.group(1)) if kld else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen05")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--speed-only", action="store_true", help="wall and peak RSS only, no perplexity / KLD")
    a = ap.parse_args()
    llama = find_llama()
    hf = fetch_hf(a.model)
    py = sys.executable
    up_env = dict(llama.env(), PYTHONPATH=str(llama.prefix / "gguf-py"))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("QREALIGN_BENCH_TMP")) as tmp:
        t = Path(tmp)
        up_f16 = t / "up-f16.gguf"
        conv = run([py, str(llama.prefix / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16", "--outfile", str(up_f16)], up_env)
        text, base = t / "benign.txt", t / "base.kld"
        if not a.speed_only:
            benign_text(text)
            subprocess.run([str(llama.bin("llama-perplexity")), "-m", str(up_f16), "-f", str(text), "-c", str(a.ctx),
                            "--kl-divergence-base", str(base), "-t", str(os.cpu_count())],
                           env=llama.env(), check=True, capture_output=True)

        def quality(path: Path) -> dict[str, float]:
            return {} if a.speed_only else perplexity(llama, path, text, base, a.ctx)
        for qt in a.types:
            up = t / f"up-{qt}.gguf"
            quant = run([str(llama.bin("llama-quantize")), str(up_f16), str(up), qt], llama.env())
            ours = t / f"ours-{qt}.gguf"
            mine = run([sys.executable, "-m", "qrealign_gguf", "convert", str(hf), "-o", str(ours), "--outtype", qt])
            results[qt] = {
                "upstream": {"wall_s": conv[0] + quant[0], "convert_s": conv[0], "quantize_s": quant[0],
                             "peak_rss_mib": max(conv[1], quant[1]), "bytes": up.stat().st_size, **quality(up)},
                "ours": {"wall_s": mine[0], "peak_rss_mib": mine[1], "bytes": ours.stat().st_size, **quality(ours)},
            }
            r = results[qt]
            r["wall_ratio"] = r["ours"]["wall_s"] / r["upstream"]["wall_s"]
            r["rss_ratio"] = r["ours"]["peak_rss_mib"] / r["upstream"]["peak_rss_mib"]
            ours_q, up_q = (("", "") if a.speed_only else
                            tuple(f" ppl {r[k]['ppl']:.4f} kld {r[k]['kld']:.5f}" for k in ("ours", "upstream")))
            print(f"{qt}: ours {r['ours']['wall_s']:.1f}s {r['ours']['peak_rss_mib']:.0f}MiB{ours_q} | upstream "
                  f"{r['upstream']['wall_s']:.1f}s ({conv[0]:.1f}+{quant[0]:.1f}) {r['upstream']['peak_rss_mib']:.0f}MiB"
                  f"{up_q} | wall x{r['wall_ratio']:.2f} rss x{r['rss_ratio']:.2f}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
