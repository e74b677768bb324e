"""Quality per bit of each GGUF type on one model: bits per weight vs KL divergence to the model's own F16.

    .venv/bin/python -m tools.bench.bench_type_quality --model qwen15 [--types Q4_K_S,Q4_K_M,QR4_KO,Q5_K_S,Q5_K_M]
        [--imatrix] [--out out/type_quality] [--threads 2] [--json FILE]

No realignment here: plain conversions (round-to-nearest with the codec's scale search, or importance-weighted with
--imatrix, computed once from the built-in benign calibration prompts) of one HF model, so the types are compared
where every matrix can actually use them (a model whose rows are multiples of 256 -- the 0.5B testbed's are not,
most of its K-quant matrices fall back to Q5_0). KLD is llama-perplexity's, each variant against the F16 file's
logits on held-out text (Python stdlib source: textwrap.py + shlex.py, which no calibration set contains), in the
patched build so QR4_KO runs next to the standard types; paired ΔKLD per chunk vs the first type.
A type earns its place when its point lies below the straight line between its standard neighbours in bpw.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex as _shlex
import textwrap as _textwrap
import time
from pathlib import Path


from qrealign_gguf import ConvertJob, convert_model
from qrealign_gguf.evaluate import metrics as M
from qrealign_gguf.inspect import read_gguf_summary
from qrealign_gguf.llamacpp import find_llama
from tools import ROOT
from tools.data.fetch_model import model_dir

DEFAULT_TYPES = "Q4_K_S,Q4_K_M,QR4_KO,Q5_K_S,Q5_K_M"


def heldout_text() -> str:
    """Text no calibration set contains (and design_kld.py's too): Python's textwrap.py + shlex.py."""
    return Path(_textwrap.__file__).read_text() + "\n\n" + Path(_shlex.__file__).read_text()


def convert(src: Path, out: Path, outtype: str, **job: object) -> float:
    """Convert once (kept for reruns), in-process; returns wall seconds, 0 when reused."""
    if out.exists():
        return 0.0
    t0 = time.time()
    convert_model(ConvertJob(model=src, output=out, outtype=outtype, **job))
    return time.time() - t0


def bpw(f: Path) -> tuple[float, float]:
    """(whole file, layer matrices only): bits per weight; token_embd/output are the same in every K mix."""
    s = read_gguf_summary(f)
    blk = [r for r in s.tensors if r.name.startswith("blk.") and len(r.shape) >= 2]
    n = sum(math.prod(r.shape) for r in blk)
    return s.bits_per_weight, 8 * sum(r.nbytes for r in blk) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory, or a fetch_model.py name (e.g. qwen15)")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--imatrix", action="store_true", help="importance-weighted conversions (built-in benign prompts)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "type_quality")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    src = model_dir(a.model)
    a.out.mkdir(parents=True, exist_ok=True)
    build = find_llama("patched")

    text = a.out / "heldout.txt"
    text.write_text(heldout_text())
    ref = a.out / f"{src.name}-F16.gguf"
    convert(src, ref, "F16", threads=a.threads)
    base = a.out / f"{src.name}-F16.kld"
    if not base.exists():
        M.kld_base(ref, text, base, a.n_ctx, threads=a.threads, build=build)

    extra, tag = {"threads": a.threads}, "rtn"
    if a.imatrix:
        im = a.out / f"{src.name}.imatrix.gguf"
        if not im.exists():  # the importance pass rides on a throwaway conversion
            convert(src, a.out / "imatrix-pass.gguf", "Q8_0", threads=a.threads, calib="builtin:benign",
                    calib_samples=64, save_imatrix=im)
            (a.out / "imatrix-pass.gguf").unlink()
        extra, tag = {"threads": a.threads, "imatrix": im}, "imatrix"

    rows: dict[str, dict] = {}
    for t in a.types.split(","):
        suffix = ".qrealign.gguf" if t.startswith("QR") else ".gguf"
        f = a.out / f"{src.name}-{tag}-{t}{suffix}"
        secs = convert(src, f, t, **extra)
        r = M.kld_variant(f, base, a.n_ctx, threads=a.threads, build=build)
        whole, blk = bpw(f)
        rows[t] = {"bpw": whole, "bpw_blk": blk, "kld": r.kld, "kld_unc": r.kld_unc, "ppl": r.ppl,
                   "ppl_base": r.ppl_base, "kld_chunks": r.kld_chunks, "convert_s": secs}
        print(f"{t}: bpw {whole:.3f} (layers {blk:.3f})  KLD {r.kld:.5f} ± {r.kld_unc or 0:.5f}", flush=True)

    first = next(iter(rows))
    print(f"\n{src.name}, {tag}, KLD vs F16 on {text.name} (n_ctx {a.n_ctx}, "
          f"{len(rows[first]['kld_chunks'])} chunks), patched llama.cpp, {a.threads} threads")
    print(f"{'type':8} {'bpw':>6} {'bpw(blk)':>8} {'KLD':>9} {'±':>8} {'ΔKLD vs ' + first:>22} {'PPL':>8}")
    for t, r in rows.items():
        pd = M.paired_delta(rows[first]["kld_chunks"], r["kld_chunks"]) if t != first else None
        r["kld_delta"] = pd
        d = f"{pd[0]:+.5f} ± {pd[1]:.5f}" if pd else "-"
        print(f"{t:8} {r['bpw']:6.3f} {r['bpw_blk']:8.3f} {r['kld']:9.5f} {r['kld_unc'] or 0:8.5f} {d:>22} "
              f"{r['ppl']:8.4f}")
    if a.json:
        a.json.write_text(json.dumps({"model": str(src), "mode": tag, "n_ctx": a.n_ctx, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
