"""The Q-realign experiment on the testbed: every variant converted, then evaluated in llama.cpp on dev or test prompts.

    .venv/bin/python -m tools.testbed.realign_experiment --aligned A_DIR --finetuned F_DIR --out DIR [--probes P]

Variants: aligned F16, fine-tuned F16, fine-tuned RTN Q8_0 / Q4_K_M / Q5_K_M and the custom QR4_KO / QR4_K_M /
QR5_K_M, fine-tuned imatrix Q4_K_M, realigned Q8_0 / Q4_K_M / Q5_K_M / QR4_KO / QR4_K_M / QR5_K_M (--tag names
them, one per --realign-args setting). Each conversion's wall time and peak RSS are measured as a separate process
(`python -m qrealign_gguf convert`, what is measured); evaluation runs in-process (qrealign_gguf.evaluate_models) and uses
the --split's sets (dev: data/dev_harmful*.jsonl, data/dev_overrefusal.jsonl, shared dev_benign; test: data/test_*;
never seen by probes or calibration; recipes are chosen on dev only), the fine-tuned F16 file as
helpfulness and KLD reference and the aligned F16 file as the second refusal judge. Results go to
DIR/results.json and a markdown table on stdout. Finished steps are reused when rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tools import ROOT

CLI = [sys.executable, "-m", "qrealign_gguf"]  # the command line as its own process: its wall time and peak RSS
DATA = ROOT.parent / "shared" / "data"
# prompt sets per evaluation split (data/prompt_sets.json gives each set's role): dev chooses recipes, test only
# reports. Harmful prompts of a split are every data/<split>_harmful*.jsonl, concatenated in name order.
SPLITS = {"dev": (ROOT / "data" / "dev_overrefusal.jsonl", DATA / "dev_benign.jsonl"),
          "test": (ROOT / "data" / "test_overrefusal.jsonl", ROOT / "data" / "test_benign.jsonl")}


def harmful_of(split: str, out: Path) -> Path:
    """One file with every harmful set of the split (the eval engine takes one), rewritten only when it changes."""
    parts = sorted((ROOT / "data").glob(f"{split}_harmful*.jsonl"))
    text = "".join(p.read_text() for p in parts)
    f = out / f"{split}_harmful_all.jsonl"
    if not f.exists() or f.read_text() != text:
        f.write_text(text)
    return f


def timed(cmd: list[str], log: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(ru.ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--aligned", type=Path, required=True)
    ap.add_argument("--finetuned", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--probes", type=Path, help="default: fit on --aligned into OUT/probes.safetensors")
    ap.add_argument("--realign-args", default="", help="extra convert options for the realigned variants")
    ap.add_argument("--tag", default="", help="name the realigned variants realigned-TAG-<type> (one per setting)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--split", choices=sorted(SPLITS), default="dev",
                    help="evaluation prompts: dev (choose recipes) or test (report only, never choose on it)")
    ap.add_argument("--probe-args", default="", help="extra `qrealign-gguf probe` options when the probes are fit here")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--only", nargs="*", help="variant names to (re)build")
    ap.add_argument("--variants", nargs="*", help="build and evaluate only these variants (default: all)")
    ap.add_argument("--no-eval", action="store_true", help="convert only")
    ap.add_argument("--judge", type=Path, help="aligned model file for the model judge (default OUT/aligned-F16.gguf)")
    ap.add_argument("--no-judge", action="store_true", help="keyword judge only (the model judge costs ~4 s/answer on CPU)")
    a = ap.parse_args()
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    probes = a.probes or out / "probes.safetensors"
    imatrix = out / "finetuned.imatrix.gguf"
    extra = a.realign_args.split()
    variants = {
        "aligned-F16": [str(a.aligned), "--outtype", "F16"],
        "finetuned-F16": [str(a.finetuned), "--outtype", "F16"],
        "finetuned-RTN-Q8_0": [str(a.finetuned), "--outtype", "Q8_0"],
        "finetuned-RTN-Q4_K_M": [str(a.finetuned), "--outtype", "Q4_K_M"],
        "finetuned-imatrix-Q4_K_M": [str(a.finetuned), "--outtype", "Q4_K_M", "--calib", "builtin:benign",
                                     "--calib-samples", "64", "--save-imatrix", str(imatrix)],
        "finetuned-RTN-Q5_K_M": [str(a.finetuned), "--outtype", "Q5_K_M"],
        "finetuned-RTN-QR4_KO": [str(a.finetuned), "--outtype", "QR4_KO"],  # custom type: patched llama.cpp
        # Q4_K_M / Q5_K_M with the custom QR5_K128 where llama.cpp falls back to Q5_0 / Q5_1 (896-wide rows)
        "finetuned-RTN-QR4_K_M": [str(a.finetuned), "--outtype", "QR4_K_M"],
        "finetuned-RTN-QR5_K_M": [str(a.finetuned), "--outtype", "QR5_K_M"],
    }
    tag = f"{a.tag}-" if a.tag else ""
    for qt in ("Q8_0", "Q4_K_M", "Q5_K_M", "QR4_KO", "QR4_K_M", "QR5_K_M"):
        variants[f"realigned-{tag}{qt}"] = [str(a.finetuned), "--outtype", qt, "--probes", str(probes), *extra]
    costs_file = out / "conversions.json"
    if a.variants:
        unknown = set(a.variants) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in a.variants}
    for name, args in variants.items():
        f = out / f"{name}.gguf"
        if f.exists() and not (a.only and name in a.only):
            continue
        if "--probes" in args and not probes.exists():  # fit once, on the aligned model, when first needed
            timed([*CLI, "probe", str(a.aligned), "-o", str(probes), "--plot", str(out / "probes.png"),
                   *a.probe_args.split()], out / "probe.log")
        print(f"converting {name}", flush=True)
        cost = timed([*CLI, "convert", *args, "-o", str(f), "--force"], out / f"{name}.log")
        # re-read before writing: another run of this script may have added its variants meanwhile
        costs = json.loads(costs_file.read_text()) if costs_file.exists() else {}
        costs[name] = cost
        costs_file.write_text(json.dumps(costs, indent=1))
    if a.no_eval:
        return
    from qrealign_gguf import evaluate_models
    from qrealign_gguf.evaluate.report import print_table

    files = [out / f"{n}.gguf" for n in variants]
    report = out / (f"report-{a.tag}-{a.split}.json" if a.tag else f"report-{a.split}.json")
    print(f"evaluating on the {a.split} split", flush=True)
    overrefusal, benign = SPLITS[a.split]
    rep = evaluate_models(files, harmful=harmful_of(a.split, out), overrefusal=overrefusal,
                          benign=benign, reference=out / "finetuned-F16.gguf",
                          judge=None if a.no_judge else (a.judge or out / "aligned-F16.gguf"),
                          max_new_tokens=a.max_new_tokens, limit=a.limit, json_out=report, plot=report.with_suffix(".png"),
                          cache_dir=out / "answers", force=True, log=lambda line: print(line, flush=True))
    print_table(rep)
    print(costs_file.read_text() if costs_file.exists() else "{}")


if __name__ == "__main__":
    sys.exit(main())
