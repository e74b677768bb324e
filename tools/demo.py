"""`make demo`: convert the default model (SmolLM2-135M-Instruct from PyPI) and ask it one question in llama.cpp.

    .venv/bin/python -m tools.demo [--outtype Q4_K_M] [--prompt TEXT]

Prints what it converts, the file it wrote and the model's answer; llama-completion's own log goes to
out/demo-llama.log."""
from __future__ import annotations

import argparse
import subprocess
import sys

from qrealign_gguf import ConvertJob, convert_model
from qrealign_gguf.inspect import read_gguf_summary
from qrealign_gguf.llamacpp import find_llama
from tools import ROOT
from tools.data.fetch_model import fetch_hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outtype", default="Q4_K_M")
    ap.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    a = ap.parse_args()
    hf = fetch_hf("smollm2")
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    gguf_path = out / f"SmolLM2-135M-Instruct-{a.outtype}.gguf"
    print(f"converting {hf} to {a.outtype}", flush=True)
    res = convert_model(ConvertJob(model=hf, output=gguf_path, outtype=a.outtype, force=True))
    s = read_gguf_summary(res.files[0])
    print(f"wrote {res.files[0].relative_to(ROOT)} ({s.bits_per_weight:.2f} bits per weight, {res.seconds:.1f} s)")

    llama = find_llama()
    log = out / "demo-llama.log"
    print(f"\n$ llama-completion -m {gguf_path.name} (chat template from the file, greedy; its log: "
          f"{log.relative_to(ROOT)})\n", flush=True)
    with log.open("w", encoding="utf-8") as fh:
        r = subprocess.run([str(llama.bin("llama-completion")), "-m", str(gguf_path), "-p", a.prompt, "-cnv", "-st",
                            "-n", "64", "--temp", "0", "--simple-io", "--no-warmup"],
                           env=llama.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fh, text=True)
    print(r.stdout.strip())  # the conversation: user, the prompt, assistant, the answer
    if r.returncode != 0:
        sys.exit(f"llama-completion failed (exit {r.returncode}); its log: {log}")


if __name__ == "__main__":
    main()
