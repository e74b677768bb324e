#!/usr/bin/env bash
# The GPU check of native/llama_patches' CUDA kernels (QR4_KO, QR5_K128), in two steps because the device machine
# (the `device` tool) can download nothing and takes at most 64 MiB of working tree:
#   here:          tools/build/gpu_check_llama_cuda.sh prepare        -> out/gpu-src/llama-src.tar.gz (patched
#                  vendored llama.cpp without its vocab models, ~25 MiB; out/ is git-ignored: carry it)
#   on the device: tools/build/gpu_check_llama_cuda.sh run [LOGDIR]  builds ggml-cuda for the local GPU
#                  (no FlashAttention kernels, to fit a short lease) + test-backend-ops, then runs
#                  `test-backend-ops test -b CUDA0 -p qr4_ko` and `-p qr5_k128`: every op the CUDA backend
#                  accepts for the custom types (MUL_MAT through MMVQ and cuBLAS, MUL_MAT_ID, GET_ROWS, CPY)
#                  against the CPU backend.
# Exit status: 0 when both test-backend-ops runs pass. Device call, e.g.:
#   run(command="bash tools/build/gpu_check_llama_cuda.sh run $OUT", carry=["out/gpu-src"], timeout_s=580)
set -euo pipefail
VERSION=0.3.36
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${QREALIGN_CACHE:-$HOME/.cache/qrealign-gguf}
PY=${PYTHON:-python3}
TARBALL=${QREALIGN_GPU_SRC:-$ROOT/out/gpu-src/llama-src.tar.gz}

case "${1:-}" in
  prepare)
    . "$ROOT/tools/build/llama_source.sh"
    work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
    llama_unpack "$work/src" "$ROOT"/native/llama_patches/*.patch
    mkdir -p "$(dirname "$TARBALL")"
    tar czf "$TARBALL" -C "$work/src/vendor" --exclude='llama.cpp/models/*.gguf' --exclude='llama.cpp/docs' \
        --exclude='llama.cpp/.github' --exclude='llama.cpp/tools/server/public*' --exclude='llama.cpp/.git' llama.cpp
    echo "$TARBALL ($(du -m "$TARBALL" | cut -f1) MiB): carry out/gpu-src to the device and run '$0 run'"
    ;;
  run)
    logdir=${2:-$ROOT/out/gpu-check}; mkdir -p "$logdir"
    [ -f "$TARBALL" ] || { echo "no $TARBALL: run '$0 prepare' here first and carry out/gpu-src"; exit 2; }
    nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$logdir/gpu.txt"
    work=$(mktemp -d); tar xzf "$TARBALL" -C "$work"; L="$work/llama.cpp"
    start=$(date +%s)
    cmake -S "$L" -B "$L/build" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-native}" -DGGML_CUDA_FA=OFF \
        -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release > "$logdir/cmake.log" 2>&1 || { tail -30 "$logdir/cmake.log"; exit 3; }
    cmake --build "$L/build" -j"$(nproc)" --target test-backend-ops > "$logdir/build.log" 2>&1 \
        || { grep -B2 -A8 -m5 "error" "$logdir/build.log"; exit 3; }
    echo "build: $(( $(date +%s) - start )) s"
    rc=0
    for t in qr4_ko qr5_k128; do
      "$L/build/bin/test-backend-ops" test -b CUDA0 -p "$t" 2>&1 | tee "$logdir/test-backend-ops-$t.log" | tail -25 || rc=1
    done
    exit $rc
    ;;
  *) echo "usage: $0 prepare | run [LOGDIR]"; exit 2 ;;
esac
