#!/usr/bin/env bash
# Build the CUDA codec (native/codec_cuda.cu) into a shared library, when nvcc exists.
#   tools/build/build_cuda.sh          -> qrealign_gguf/_cuda/libqrealign_cuda.so (atomic replace)
#   tools/build/build_cuda.sh OUT.so   -> OUT.so
#   tools/build/build_cuda.sh --check  -> compile only, to a temp dir (what `make cuda-check` runs)
# No nvcc: prints "skipped: nvcc not found" and exits 0 (the CPU codec is unaffected).
# Env: NVCC (compiler), QREALIGN_CUDA=0 (skip), QREALIGN_CUDA_ARCHS (default "80 86 89 90"; PTX for the
# last one is always embedded so newer GPUs JIT it).
#
# The numerics flags are part of the byte-equality contract with the C codec (native/qr_hd.h):
# no FMA contraction, no flush-to-zero, IEEE division and square root, no fast math.
set -euo pipefail
cd "$(dirname "$0")/../.."
NUMERICS=(-fmad=false -ftz=false -prec-div=true -prec-sqrt=true)
SRC=native/codec_cuda.cu

if [ "${QREALIGN_CUDA:-1}" = 0 ]; then echo "cuda: skipped (QREALIGN_CUDA=0)"; exit 0; fi
NVCC=${NVCC:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc; } || true
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then echo "cuda: skipped: nvcc not found (CPU codec only)"; exit 0; fi

archs=(${QREALIGN_CUDA_ARCHS:-80 86 89 90})
gencode=()
for a in "${archs[@]}"; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
gencode+=(-gencode "arch=compute_${archs[-1]},code=compute_${archs[-1]}")
common=(-std=c++17 -O3 -Inative "${NUMERICS[@]}" -Xcompiler -fPIC,-ffp-contract=off --threads 0)

if [ "${1:-}" = --check ]; then
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
  "$NVCC" "${common[@]}" "${gencode[@]}" -c "$SRC" -o "$out/codec_cuda.o"
  echo "cuda: compiled $SRC for sm_${archs[*]} (+PTX) with $("$NVCC" --version | tail -1)"
  exit 0
fi

dst=${1:-qrealign_gguf/_cuda/libqrealign_cuda.so}
mkdir -p "$(dirname "$dst")"
tmp="$dst.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# cudart linked statically (nvcc's default): the library needs only the driver (libcuda.so) at run time
"$NVCC" "${common[@]}" "${gencode[@]}" -shared -cudart static -o "$tmp" "$SRC"
mv -f "$tmp" "$dst"   # rename: a process that has the old library loaded keeps its copy
echo "cuda: built $dst (sm_${archs[*]} + PTX)"
