#!/usr/bin/env bash
# Compile every CUDA source in native/ with nvcc (no GPU needed) so a CUDA compile error fails `make test`.
# Same numerics flags as tools/build/build_cuda.sh (they are part of the CPU/GPU byte-equality contract).
set -euo pipefail
cd "$(dirname "$0")/../.."
shopt -s nullglob
srcs=(native/*.cu)
if [ ${#srcs[@]} -eq 0 ]; then echo "cuda-check: no CUDA sources yet"; exit 0; fi
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "cuda-check: nvcc not found, CUDA sources not compiled (CPU path only)"; exit 0; fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for s in "${srcs[@]}"; do
  "$NVCC" -std=c++17 -O2 -Inative -fmad=false -ftz=false -prec-div=true -prec-sqrt=true \
    -Xcompiler -fPIC,-ffp-contract=off,-Wall --threads 0 \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=compute_90 \
    -c "$s" -o "$out/$(basename "$s").o"
done
echo "cuda-check: compiled ${#srcs[@]} CUDA source(s) with $("$NVCC" --version | tail -1)"
