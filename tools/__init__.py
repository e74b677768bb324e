"""Developer tools around the qrealign_gguf package (not shipped in the wheel).

Run from the repository root, Python tools as modules, shell scripts with bash:
    .venv/bin/python -m tools.demo                      # what `make demo` runs
    .venv/bin/python -m tools.bench.bench_convert --model smollm2 --types Q8_0 Q4_K_M
    bash tools/build/build_llama.sh patched

    build/    the pinned llama.cpp build (build_llama.sh, llama_source.sh), the CUDA codec build and the CUDA
              compile/GPU checks (bash)
    data/     model fetcher, prompt-set builder, keyword-judge validation
    bench/    speed and quality benchmarks (docs/BENCHMARKS.md)
    testbed/  the safety testbed and the realignment experiment run on it
    studies/  type-design studies (docs/BENCHMARKS.md round 8)
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root: data/, native/, out/
