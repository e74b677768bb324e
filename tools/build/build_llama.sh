#!/usr/bin/env bash
# Build the pinned llama.cpp (vendored in the llama-cpp-python sdist) once and cache it.
# Cache key = sdist version + hash of our patches + cmake flags, so a changed patch or flag rebuilds.
# Usage: tools/build/build_llama.sh [stock|patched] [--check]  -> prints the install prefix on the last line.
#        --check: build nothing; print the prefix and exit 0 if that build is cached, else exit 1.
set -euo pipefail
VERSION=0.3.36
FLAVOUR=${1:-stock}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${QREALIGN_CACHE:-$HOME/.cache/qrealign-gguf}
PY=${PYTHON:-python3}
TARGETS="llama llama-completion llama-perplexity llama-quantize llama-imatrix llama-bench llama-tokenize"
# the patched flavour (qrealign's custom types): library, completion, perplexity (KLD), bench, quantize
[ "$FLAVOUR" = patched ] && TARGETS="llama llama-completion llama-perplexity llama-bench llama-quantize"
FLAGS="-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"

patches=""
if [ "$FLAVOUR" = patched ]; then patches=$(ls "$ROOT"/native/llama_patches/*.patch 2>/dev/null || true); fi
key=$( { echo "$VERSION $FLAVOUR $FLAGS $TARGETS"; for p in $patches; do cat "$p"; done; } | sha256sum | cut -c1-16)
prefix="$CACHE/llama.cpp/$VERSION-$FLAVOUR-$key"
. "$ROOT/tools/build/llama_source.sh"
llama_claim "$VERSION-$FLAVOUR-$key" "${2:-}"
# shellcheck disable=SC2086  # $patches: a list of paths without spaces (native/llama_patches/*.patch)
llama_workdir "$VERSION-$FLAVOUR-$key" $patches
echo "building llama.cpp $VERSION ($FLAVOUR) -> $prefix (first time ~13 min on 2 cores)" >&2
cmake -S "$lsrc" -B "$build" $FLAGS $launcher -DCMAKE_INSTALL_PREFIX="$prefix" -DCMAKE_BUILD_RPATH='$ORIGIN/../lib;$ORIGIN' >&2
cmake --build "$build" -j"$(nproc)" --target $TARGETS >&2
rm -rf "$prefix"; mkdir -p "$prefix/bin" "$prefix/lib"
for t in $TARGETS; do [ -f "$build/bin/$t" ] && cp "$build/bin/$t" "$prefix/bin/"; done
find "$build" -name '*.so*' -exec cp -P {} "$prefix/lib/" \;
cp -r "$lsrc/gguf-py" "$prefix/gguf-py"
cp "$lsrc/convert_hf_to_gguf.py" "$prefix/"; cp -r "$lsrc/conversion" "$prefix/" 2>/dev/null || true
cp -r "$lsrc/ggml/include" "$prefix/include"; cp "$lsrc/include/llama.h" "$prefix/include/"
# rpath for the copied binaries
cp -r "$src/llama_cpp" "$prefix/python_llama_cpp"  # pure-python binding; uses LLAMA_CPP_LIB_PATH
touch "$prefix/.complete"
rm -rf "$src"
echo "$prefix"
