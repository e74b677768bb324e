# Sourced by build_llama.sh, llama_cuda_check.sh and gpu_check_llama_cuda.sh (tools/build/): the pinned llama.cpp
# source (vendored in the llama-cpp-python sdist), downloaded once into the cache and unpacked with our patches applied.
# Needs: VERSION, CACHE, PY.

# llama_sdist: path of the cached sdist (downloads it the first time)
llama_sdist() {
  local sdist="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    mkdir -p "$CACHE/sdist"
    echo "downloading llama-cpp-python==$VERSION sdist (vendored llama.cpp source)" >&2
    "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$CACHE/sdist" "llama-cpp-python==$VERSION" >&2
  fi
  echo "$sdist"
}

# llama_unpack DIR [PATCH...]: the sdist unpacked into DIR (emptied first), PATCHes applied in order to its
# vendor/llama.cpp
llama_unpack() {
  local dir=$1; shift
  local sdist; sdist=$(llama_sdist)
  rm -rf "$dir"; mkdir -p "$dir"
  tar xzf "$sdist" -C "$dir" --strip-components=1
  local p
  for p in "$@"; do patch -d "$dir/vendor/llama.cpp" -p1 --quiet < "$p"; done
}
