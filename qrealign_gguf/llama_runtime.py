"""Locate (and on first use, build) the pinned llama.cpp: llama-cpp-python 0.3.36's vendored source.

The build lives in a cache keyed by version + patches + flags (tools/build_llama.sh). Everything that runs
llama.cpp -- the test oracle, `make demo`, `eval` -- goes through find_llama().
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "tools" / "build_llama.sh"


class LlamaNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class LlamaBuild:
    prefix: Path

    def bin(self, name: str) -> Path:
        return self.prefix / "bin" / name

    @property
    def lib_dir(self) -> Path:
        return self.prefix / "lib"

    @property
    def python_binding(self) -> Path:
        """Directory holding the pure-python `llama_cpp` package from the sdist (load with LLAMA_CPP_LIB_PATH)."""
        return self.prefix / "python_llama_cpp"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = f"{self.lib_dir}:{env.get('LD_LIBRARY_PATH', '')}"
        env["LLAMA_CPP_LIB_PATH"] = str(self.lib_dir)
        return env


def find_llama(flavour: str = "stock", build: bool = True) -> LlamaBuild:
    """The cached pinned build. QREALIGN_LLAMA_PREFIX overrides; otherwise build (or reuse) via the script."""
    override = os.environ.get("QREALIGN_LLAMA_PREFIX" if flavour == "stock" else "QREALIGN_LLAMA_PATCHED_PREFIX")
    if override:
        return LlamaBuild(Path(override))
    if not BUILD_SCRIPT.exists():
        raise LlamaNotFound("llama.cpp build script missing; set QREALIGN_LLAMA_PREFIX to a llama.cpp install prefix")
    if not build:
        raise LlamaNotFound("pinned llama.cpp not built; run `make llama`")
    res = subprocess.run(["bash", str(BUILD_SCRIPT), flavour], capture_output=True, text=True)
    if res.returncode != 0:
        raise LlamaNotFound(f"building llama.cpp failed:\n{res.stderr[-4000:]}")
    return LlamaBuild(Path(res.stdout.strip().splitlines()[-1]))
