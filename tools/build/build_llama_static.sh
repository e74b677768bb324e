#!/usr/bin/env bash
# Build the pinned llama.cpp as static programs for a device and cache them: what `qrealign-gguf package --target`
# bundles and what `make edge-check` runs under qemu. Static (glibc, libstdc++ and ggml linked in, no OpenMP), so
# a bundle runs on a bare device and qemu-aarch64 needs no ARM sysroot.
# Cache key = sdist version + flavour + target + flags + compiler version + our patches (patched) + the toolchain
# file, next to build_llama.sh's shared builds.
# Usage: tools/build/build_llama_static.sh stock|patched host|linux-aarch64 [--check]  -> prefix on the last line
#   host:          this machine's architecture, the same CPU baseline as build_llama.sh (x86-64: AVX2/FMA/F16C)
#   linux-aarch64: ARMv8.2-A + dotprod (Raspberry Pi 5, phones since ~2018), cross-compiled with
#                  aarch64-linux-gnu-g++ (Debian: apt-get install g++-aarch64-linux-gnu; `make edge-setup`)
#   --check:       build nothing; print the prefix and exit 0 if that build is cached, else exit 1
# The prefix holds bin/llama-completion, bin/llama-perplexity, lib/libggml*.a and include/ (the kernel checks link against ggml).
set -euo pipefail
VERSION=0.3.36
FLAVOUR=${1:-}
TARGET=${2:-}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${QREALIGN_CACHE:-$HOME/.cache/qrealign-gguf}
PY=${PYTHON:-python3}
TARGETS="llama-completion llama-perplexity"  # perplexity: the edge checks compare a model's numbers with x86's
ARM_ARCH=armv8.2-a+dotprod
FLAGS="-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_EXE_LINKER_FLAGS=-static -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"

case "$FLAVOUR" in stock|patched) ;; *) echo "usage: $0 stock|patched host|linux-aarch64 [--check]" >&2; exit 2 ;; esac
case "$TARGET" in
  host)
    CXX=${CXX:-c++}
    toolchain="" ;;
  linux-aarch64)
    CXX=aarch64-linux-gnu-g++
    toolchain="$ROOT/tools/build/aarch64-linux-gnu.cmake"
    FLAGS="$FLAGS -DCMAKE_TOOLCHAIN_FILE=$toolchain -DGGML_CPU_ARM_ARCH=$ARM_ARCH" ;;
  *) echo "usage: $0 stock|patched host|linux-aarch64 [--check]" >&2; exit 2 ;;
esac
# the patched ARM build also carries ggml's test-backend-ops: `make edge-check` runs it under qemu for the custom
# types (patch 0007 makes its CPU-vs-reference-CPU mode compare the NEON kernel with the generic one)
if [ "$FLAVOUR" = patched ] && [ "$TARGET" = linux-aarch64 ]; then
  TARGETS="$TARGETS test-backend-ops"
  FLAGS=${FLAGS/-DLLAMA_BUILD_TESTS=OFF/-DLLAMA_BUILD_TESTS=ON}
fi
if ! command -v "$CXX" >/dev/null; then
  echo "no $CXX for the $TARGET build: install it (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu, or make edge-setup)" >&2
  exit 2
fi

patches=""
if [ "$FLAVOUR" = patched ]; then patches=$(ls "$ROOT"/native/llama_patches/*.patch 2>/dev/null || true); fi
# the key names the toolchain file by its content (below), not its path: every checkout shares one cached build
key=$( { echo "$VERSION $FLAVOUR $TARGET ${FLAGS//$ROOT\//} $TARGETS"; "$CXX" --version | head -1;
         if [ -n "$toolchain" ]; then cat "$toolchain"; fi; for p in $patches; do cat "$p"; done; } | sha256sum | cut -c1-16)
prefix="$CACHE/llama.cpp/$VERSION-$FLAVOUR-$TARGET-static-$key"
. "$ROOT/tools/build/llama_source.sh"
llama_claim "$VERSION-$FLAVOUR-$TARGET-static-$key" "${3:-}"
# shellcheck disable=SC2086  # $patches: a list of paths without spaces (native/llama_patches/*.patch)
llama_workdir "$VERSION-$FLAVOUR-$TARGET-static-$key" $patches
echo "building static llama.cpp $VERSION ($FLAVOUR, $TARGET) -> $prefix (first time ~10 CPU-minutes)" >&2
# shellcheck disable=SC2086  # $FLAGS / $launcher: word lists
cmake -S "$lsrc" -B "$build" $FLAGS $launcher >&2
# shellcheck disable=SC2086
cmake --build "$build" -j"${LLAMA_JOBS:-$(nproc)}" --target $TARGETS >&2
rm -rf "$prefix"; mkdir -p "$prefix/bin" "$prefix/lib"
for t in $TARGETS; do cp "$build/bin/$t" "$prefix/bin/"; done
find "$build" -name 'libggml*.a' -exec cp {} "$prefix/lib/" \;
cp -r "$lsrc/ggml/include" "$prefix/include"
# what a check needs to say which machine code it ran: the compiler and flags of this build
{ echo "target=$TARGET"; echo "flavour=$FLAVOUR"; echo "cxx=$("$CXX" --version | head -1)"; echo "flags=${FLAGS//$ROOT\//}";
  if [ "$TARGET" = linux-aarch64 ]; then echo "arm_arch=$ARM_ARCH"; fi; } > "$prefix/BUILDINFO"
touch "$prefix/.complete"
rm -rf "$src"
echo "$prefix"
