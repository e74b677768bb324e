#!/bin/bash
# The auto-round peer (docs/BENCHMARKS.md, "The auto-round peer"): Intel auto-round 0.16.1 writing gguf:q4_k_m of
# a fine-tuned HF model, in its own venv (its pins clash with ours), calibrated on our calibration prompts.
#   bash tools/bench/peer_autoround.sh MODEL_DIR OUT_DIR [ITERS]     (ITERS 0 = its opt-RTN scale search)
# Needs .venv-autoround (python -m venv .venv-autoround && .venv-autoround/bin/pip install auto-round==0.16.1) and the
# llama-cpp-python 0.3.36 sdist that `make llama` caches: its gguf-py knows the architectures auto-round's bundled
# converter names (PyPI gguf 0.19.0 lacks MODEL_ARCH.DFLASH and the converter fails on import).
set -euo pipefail
MODEL=$1 OUT=$2 ITERS=${3:-0}
SDIST=$HOME/.cache/qrealign-gguf/sdist/llama_cpp_python-0.3.36.tar.gz
mkdir -p "$OUT/src"
[ -d "$OUT/src/llama_cpp_python-0.3.36" ] || tar xzf "$SDIST" -C "$OUT/src"
export LLAMA_CPP_ROOT=$OUT/src/llama_cpp_python-0.3.36/vendor/llama.cpp
export PYTHONPATH=$LLAMA_CPP_ROOT/gguf-py HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# auto-round drops samples shorter than --seqlen: join the (short) calibration prompts into >= 300-token documents
.venv/bin/python - "$MODEL" "$OUT/calib.jsonl" <<'PY'
import json, sys
from transformers import AutoTokenizer
from qrealign_gguf.prompts import load_prompts
tok, docs, cur = AutoTokenizer.from_pretrained(sys.argv[1]), [], []
for p in load_prompts("builtin:benign"):
    cur.append(p.text)
    if len(tok("\n\n".join(cur))["input_ids"]) >= 300:
        docs.append("\n\n".join(cur)); cur = []
with open(sys.argv[2], "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
PY
/usr/bin/time -v .venv-autoround/bin/auto-round --model "$MODEL" --format gguf:q4_k_m --iters "$ITERS" --device cpu \
  --dataset "$OUT/calib.jsonl" --nsamples 64 --seqlen 256 --output_dir "$OUT/model"
