"""Static llama.cpp programs for a device: what `package --target` bundles and `make edge-check` runs under qemu.

Built once per (flavour, target) by tools/build/build_llama_static.sh and cached next to the shared builds of
build.py. Static, so a bundle runs on a device with nothing installed and qemu-aarch64 needs no ARM sysroot.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .build import REPO

STATIC_SCRIPT = REPO / "tools" / "build" / "build_llama_static.sh"
BUILD_MINUTES = 10  # a cold build: ~10 CPU-minutes (aarch64, 606 s; host 477 s), docs/BENCHMARKS.md "Edge devices"


@dataclass(frozen=True)
class Target:
    name: str
    machine: str  # `uname -m` of a device that runs the build
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags the machine code needs (run.sh checks them)
    compiler: str  # the C++ compiler the build script uses
    describe: str


def _host() -> Target:
    machine = platform.machine()
    # x86-64: the same CPU baseline as the shared build (GGML_NATIVE=OFF turns AVX2/FMA/F16C on)
    flags = ("avx2", "fma", "f16c") if machine in ("x86_64", "AMD64") else ()
    return Target("host", machine, flags, os.environ.get("CXX", "c++"), f"this machine's architecture ({machine})")


TARGETS = {
    "linux-aarch64": Target("linux-aarch64", "aarch64", ("asimddp",), "aarch64-linux-gnu-g++",
                            "64-bit ARM Linux, ARMv8.2-A with dot product (Raspberry Pi 5, Jetson Orin, phones "
                            "since ~2018; not Raspberry Pi 3/4)"),
}
TARGET_NAMES = ("host", *TARGETS)


def target(name: str) -> Target:
    """The target by name; InputError for an unknown one."""
    if name == "host":
        return _host()
    if name not in TARGETS:
        raise InputError(f"unknown target {name!r}; choose one of: {', '.join(TARGET_NAMES)}")
    return TARGETS[name]


def check_toolchain(t: Target) -> None:
    """InputError when the compiler for the target is missing (checked before any work, so nothing is written)."""
    if shutil.which(t.compiler) is None:
        how = ("Debian/Ubuntu: `apt-get install g++-aarch64-linux-gnu` (or `make edge-setup`)"
               if t.name == "linux-aarch64" else "install a C++ compiler (g++) and cmake")
        raise InputError(f"--target {t.name} needs the {t.compiler} compiler, which is not installed; {how}")
    if shutil.which("cmake") is None:
        raise InputError(f"--target {t.name} builds llama.cpp with cmake, which is not installed")


def static_prefix(flavour: str, t: Target, build: bool = True) -> Path:
    """Install prefix of the static build (bin/llama-completion, bin/llama-perplexity, lib/libggml*.a, include/).
    build=False: only a cached one, else FileNotFoundError. Building takes ~10 CPU-minutes the first time;
    a failed build is an InputError naming the last line cmake printed."""
    check_toolchain(t)
    args = ["bash", str(STATIC_SCRIPT), flavour, t.name] + ([] if build else ["--check"])
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        if not build:
            raise FileNotFoundError(f"static llama.cpp ({flavour}, {t.name}) not built (`make edge-check` builds "
                                    f"it, or bash tools/build/build_llama_static.sh {flavour} {t.name})")
        lines = res.stderr.strip().splitlines() or ["(no output)"]
        cause = next((ln for ln in lines if "error" in ln.lower()), lines[-1])  # the compiler's, not make's last
        raise InputError(f"building llama.cpp for {t.name} failed: {cause.strip()}")
    return Path(res.stdout.strip().splitlines()[-1])
