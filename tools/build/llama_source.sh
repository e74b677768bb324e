# Sourced by build_llama.sh, build_llama_static.sh, llama_cuda_check.sh and gpu_check_llama_cuda.sh (tools/build/):
# the pinned llama.cpp source (vendored in the llama-cpp-python sdist), downloaded once into the cache and unpacked
# with our patches applied; the cache claim and build lock shared by the builds.
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

# llama_claim NAME [--check]: the cached build $CACHE/llama.cpp/NAME. Complete: prints its prefix and ends the calling
# script (exit 0). --check and not cached: exit 1. Otherwise returns holding NAME's build lock, so a second caller (a
# pytest worker, `make demo` next to `make test`) waits for the first and then reuses its result instead of wiping
# the shared source/build dir under it.
llama_claim() {
  local prefix="$CACHE/llama.cpp/$1"
  if [ -x "$prefix/bin/llama-completion" ] && [ -f "$prefix/.complete" ]; then echo "$prefix"; exit 0; fi
  if [ "${2:-}" = --check ]; then exit 1; fi
  mkdir -p "$CACHE/sdist" "$CACHE/llama.cpp"
  if command -v flock >/dev/null; then
    exec 9>"$CACHE/llama.cpp/.lock-$1"
    flock 9
    if [ -x "$prefix/bin/llama-completion" ] && [ -f "$prefix/.complete" ]; then echo "$prefix"; exit 0; fi
  fi
}

# llama_workdir NAME [PATCH...]: the patched source unpacked fresh into $CACHE/src/NAME, and for the cmake calls that
# follow it sets src (that dir, removed when the build is installed), lsrc (its llama.cpp), build (the build dir) and
# launcher (ccache flags when ccache exists). A fixed build dir inside src keeps ccache hits across source-dir
# changes (ccache hashes relative paths with base_dir): a patch change rebuilds only what it touches.
llama_workdir() {
  src="$CACHE/src/$1"; shift
  llama_unpack "$src" "$@"
  lsrc="$src/vendor/llama.cpp"
  build="$src/build"
  launcher=""
  if command -v ccache >/dev/null; then
    launcher="-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache"
  fi
  export CCACHE_BASEDIR="$src" CCACHE_NOHASHDIR=1
}
