#!/usr/bin/env bash
# Compile-only check of the CUDA kernels that native/llama_patches add to the pinned llama.cpp (QR4_KO, QR5_K128):
# every ggml-cuda .cu file a patch touches is compiled with nvcc from the patched vendored source (no GPU and no
# cmake needed: ggml-cuda's configure wants the cuBLAS library, the compile only its headers), and the objects
# must contain the QR4_KO instantiations. A pass is remembered per patch set + nvcc version + flags.
# Usage: tools/build/llama_cuda_check.sh        (prints one line; exit != 0 on a compile error)
set -euo pipefail
VERSION=0.3.36
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${QREALIGN_CACHE:-$HOME/.cache/qrealign-gguf}
PY=${PYTHON:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # used after a cd below
CUBLAS_WHEEL="nvidia-cublas==13.1.1.3"  # headers only; pinned so the check is reproducible
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "llama-cuda-check: skipped: nvcc not found"; exit 0; fi

shopt -s nullglob
patches=("$ROOT"/native/llama_patches/*.patch)
files=$(cat "${patches[@]}" /dev/null | sed -n 's|^diff --git a/\(ggml/src/ggml-cuda/[^ ]*\.cu\) .*|\1|p' | sort -u)
if [ -z "$files" ]; then echo "llama-cuda-check: no patch touches ggml-cuda"; exit 0; fi
FLAGS="-std=c++17 -O3 -use_fast_math -extended-lambda -DGGML_USE_CUDA -DGGML_CUDA_USE_GRAPHS -DGGML_SCHED_MAX_COPIES=4 -gencode arch=compute_80,code=sm_80 -Xcompiler -fPIC"
key=$( { echo "$VERSION $FLAGS $CUBLAS_WHEEL"; "$NVCC" --version; cat "${patches[@]}"; } | sha256sum | cut -c1-16)
stamp="$CACHE/llama-cuda-check/$key.ok"
if [ -f "$stamp" ]; then echo "llama-cuda-check: passed before for this patch set ($(cat "$stamp"))"; exit 0; fi

# cuBLAS headers: the toolkit's if it has them, else from the pinned wheel (kept in the cache, the .so dropped)
inc=$(dirname "$(readlink -f "$NVCC")")/../include
if [ ! -f "$inc/cublas_v2.h" ]; then
  inc="$CACHE/cublas-headers/${CUBLAS_WHEEL#*==}"
  if [ ! -f "$inc/cublas_v2.h" ]; then
    tmp=$(mktemp -d)
    echo "llama-cuda-check: fetching cuBLAS headers ($CUBLAS_WHEEL)" >&2
    "$PY" -m pip download --quiet --no-deps -d "$tmp" "$CUBLAS_WHEEL" >&2
    (cd "$tmp" && "$PY" -m zipfile -e ./*.whl x >/dev/null)
    mkdir -p "$inc" && cp "$tmp"/x/nvidia/*/include/*.h "$inc/"
    rm -rf "$tmp"
  fi
fi

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
. "$ROOT/tools/build/llama_source.sh"
llama_unpack "$work/src" "${patches[@]}"
L="$work/src/vendor/llama.cpp"
start=$(date +%s)
echo "$files" | xargs -P "$(nproc)" -I{} sh -c \
  "\"$NVCC\" $FLAGS -I$L/ggml/include -I$L/ggml/src -I$L/ggml/src/ggml-cuda -I$inc -c $L/{} -o $work/\$(basename {}).o"
# the test program the GPU check runs (tools/build/gpu_check_llama_cuda.sh): a host-compiler syntax check suffices here
for f in $(cat "${patches[@]}" | sed -n 's|^diff --git a/\(tests/[^ ]*\.cpp\) .*|\1|p' | sort -u); do
  "${CXX:-c++}" -std=c++17 -fsyntax-only -I"$L/ggml/include" -I"$L/ggml/src" -I"$L/include" -I"$L/common" "$L/$f"
done
# each touched kernel file must instantiate code of both custom types (ggml-cuda.cu only gains supports_op cases)
for f in $files; do
  [ "$(basename "$f")" = ggml-cuda.cu ] && continue
  nm -C "$work/$(basename "$f").o" > "$work/syms"  # (not piped into grep -q: SIGPIPE + pipefail)
  grep -q -e 'qr4_ko' -e '(ggml_type)240' "$work/syms" \
    || { echo "llama-cuda-check: $f compiled but holds no QR4_KO kernel"; exit 1; }
  grep -q -e 'qr5_k128' -e '(ggml_type)241' "$work/syms" \
    || { echo "llama-cuda-check: $f compiled but holds no QR5_K128 kernel"; exit 1; }
done
mkdir -p "$(dirname "$stamp")"
echo "$(echo "$files" | wc -l) files, sm_80, $("$NVCC" --version | tail -1), $(( $(date +%s) - start )) s" > "$stamp"
echo "llama-cuda-check: compiled $(cat "$stamp")"
