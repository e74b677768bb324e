"""Wall time and peak memory of a whole realigning `convert` (the README recipe), for one or more source trees of
qrealign-gguf run one after the other on the same machine: a before/after measurement of a speed change.

    .venv/bin/python -m tools.bench.bench_realign --model DIR --probes P.safetensors --imatrix I.gguf \
        [--tree BEFORE_CHECKOUT] [--tree .] [--out out/bench_realign] [--extra "--threads 2"] [--json F]

Each tree runs `python -m qrealign_gguf convert DIR --outtype Q4_K_M --probes P --imatrix I --equalize -o ...`
with PYTHONPATH=<tree> (so its own qrealign_gguf; the native codec must be built in it: `make install` there, or
the tree is a `git worktree` whose qrealign_gguf/_native*.so was copied in) under /usr/bin/time -v, and a fresh
checkpoint directory (a resumed run would not be timed). Prints wall seconds, peak RSS and the per-layer seconds
from the log, and whether the written files are byte-identical. Run it on an otherwise idle machine: the runs
are sequential so that they do not slow each other, but anything else running slows them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools import ROOT


def run(tree: Path, a: argparse.Namespace, out: Path) -> dict:
    gguf = out / "realigned-Q4_K_M.gguf"
    ckpt = out / "ckpt"
    gguf.unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "qrealign_gguf", "convert", str(a.model), "--outtype",
           "Q4_K_M", "--probes", str(a.probes), "--imatrix", str(a.imatrix), "--equalize", "-o", str(gguf),
           "--checkpoints", str(ckpt), *a.extra.split()]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - t0
    (out / "convert.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"{tree}: convert failed (rc {res.returncode}); log: {out / 'convert.log'}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    layers = [float(s) for s in re.findall(r"^blk\.\d+ \(\d+/\d+\) \[(\d+)s\]", res.stdout + res.stderr, re.M)]
    return {"tree": str(tree), "wall_s": round(wall, 1), "peak_rss_gib": int(rss.group(1)) / 2**20 if rss else None,
            "layer_s": layers, "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()[:16], "file": str(gguf)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--probes", type=Path, required=True)
    ap.add_argument("--imatrix", type=Path, required=True)
    ap.add_argument("--tree", type=Path, action="append", help="a qrealign-gguf checkout (repeatable; default: this one)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_realign")
    ap.add_argument("--extra", default="", help="more convert options, the same for every tree")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    for k in ("model", "probes", "imatrix", "out"):  # each tree runs in its own directory
        setattr(a, k, getattr(a, k).resolve())
    rows = []
    for k, tree in enumerate(a.tree or [ROOT]):
        out = a.out / f"tree{k}"
        out.mkdir(parents=True, exist_ok=True)
        rows.append(run(tree.resolve(), a, out))
        r = rows[-1]
        print(f"{r['tree']}: {r['wall_s']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, layers "
              f"{sum(r['layer_s']):.0f} s ({min(r['layer_s'], default=0):.0f}-{max(r['layer_s'], default=0):.0f} s each), "
              f"file {r['sha256']}", flush=True)
    if len(rows) > 1:
        print(f"ratio (last / first) wall {rows[-1]['wall_s'] / rows[0]['wall_s']:.2f}, "
              f"same bytes: {len({r['sha256'] for r in rows}) == 1}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
