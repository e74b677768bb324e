"""Shared by the edge-device tests (tests/test_edge.py, tests/test_package_target.py): the static llama.cpp builds
of tools/build/build_llama_static.sh, qemu-aarch64 and the ARM cross compiler.

A build is used when it is cached (`make edge-check` builds both; `make test` does not, they take too long) or,
with QREALIGN_BUILD_EDGE=1, built by the test run; otherwise the tests skip and say how to get it. Without the
cross compiler or qemu (a machine where `make edge-setup` could not use apt) they skip as well.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qrealign_gguf.errors import InputError
from qrealign_gguf.llamacpp.static import static_prefix, target

# Raspberry Pi 5's core: ARMv8.2-A with dotprod and no SVE, what the linux-aarch64 build targets
QEMU_CPU = "cortex-a76"
QEMU = ["qemu-aarch64", "-cpu", QEMU_CPU]
CROSS_CC = "aarch64-linux-gnu-gcc"
FULL = os.environ.get("QREALIGN_EDGE_FULL") == "1"  # make edge-check: the slow checks too
FULL_REASON = "slow under qemu: `make edge-check` runs it (QREALIGN_EDGE_FULL=1)"


def require_cross_tools() -> None:
    """Skip (saying what to install) without the ARM cross compiler or qemu-aarch64."""
    missing = [t for t in (CROSS_CC, "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: apt-get install g++-aarch64-linux-gnu qemu-user; "
                    "`make edge-setup`)")


def static_build(flavour: str, target_name: str) -> Path:
    """Prefix of the static build (bin/, lib/libggml*.a, include/), or a skip saying how to get it."""
    if target_name == "linux-aarch64" and shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 not installed (Debian: apt-get install qemu-user; `make edge-setup`)")
    try:
        return static_prefix(flavour, target(target_name), build=os.environ.get("QREALIGN_BUILD_EDGE") == "1")
    except (InputError, FileNotFoundError) as e:
        pytest.skip(str(e))


def qemu(args: list[str | Path], timeout: float, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    """An aarch64 program under qemu-aarch64 (static: no sysroot needed)."""
    return subprocess.run([*QEMU, *map(str, args)], capture_output=True, timeout=timeout, **kw)


def cross_link(out: Path, prefix: Path, sources: list[Path], extra_flags: tuple[str, ...] = ()) -> Path:
    """A static aarch64 program from C sources, linked against the build's ggml (objects given as sources come
    first, so they replace the archive members that define the same symbols)."""
    root = Path(__file__).resolve().parents[1]
    # the codec's own flags (native/build_ffi.py): no fused multiply-add, so its floats match the x86 build's
    cmd = [CROSS_CC, "-O3", "-std=gnu11", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-static", *extra_flags,
           f"-I{prefix / 'include'}", f"-I{root / 'native'}", *map(str, sources), "-o", str(out),
           *(str(prefix / "lib" / f"lib{n}.a") for n in ("ggml", "ggml-cpu", "ggml-base")), "-lstdc++", "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out
