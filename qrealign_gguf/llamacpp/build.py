"""Locate (and on first use, build) the pinned llama.cpp: llama-cpp-python 0.3.36's vendored source.

The build lives in a cache keyed by version + patches + flags (tools/build/build_llama.sh). Everything that runs
llama.cpp -- the test oracle, `make demo`, `eval` -- goes through find_llama().
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "build" / "build_llama.sh"


class LlamaNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class LlamaBuild:
    prefix: Path
    flavour: str = "stock"  # "patched": native/llama_patches applied (runs qrealign's custom tensor types)

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
    """The cached pinned build. QREALIGN_LLAMA_PREFIX (QREALIGN_LLAMA_PATCHED_PREFIX for "patched") overrides;
    otherwise build (or reuse) via the script. build=False: only an already-built cache entry, else LlamaNotFound."""
    override = os.environ.get("QREALIGN_LLAMA_PREFIX" if flavour == "stock" else "QREALIGN_LLAMA_PATCHED_PREFIX")
    if override:
        return LlamaBuild(Path(override), flavour)
    if not BUILD_SCRIPT.exists():
        raise LlamaNotFound("llama.cpp build script missing; set QREALIGN_LLAMA_PREFIX to a llama.cpp install prefix")
    if not build:
        res = subprocess.run(["bash", str(BUILD_SCRIPT), flavour, "--check"], capture_output=True, text=True)
        if res.returncode != 0:
            how = "make llama" if flavour == "stock" else f"bash tools/build/build_llama.sh {flavour}"
            raise LlamaNotFound(f"pinned llama.cpp ({flavour}) not built; run `{how}`")
        return LlamaBuild(Path(res.stdout.strip().splitlines()[-1]), flavour)
    res = subprocess.run(["bash", str(BUILD_SCRIPT), flavour], capture_output=True, text=True)
    if res.returncode != 0:
        raise LlamaNotFound(f"building llama.cpp failed:\n{res.stderr[-4000:]}")
    return LlamaBuild(Path(res.stdout.strip().splitlines()[-1]), flavour)


def _custom_names(path: str | Path) -> list[str]:
    """qrealign's custom tensor types in this GGUF; [] for none or an unreadable file (the loader reports that)."""
    from ..gguf_read import custom_type_names

    try:
        return custom_type_names(path)
    except Exception:  # noqa: BLE001 - not our business to diagnose a broken file here
        return []


def build_for(path: str | Path) -> LlamaBuild:
    """The build that can run this GGUF: the patched flavour for files with qrealign's custom tensor types
    (built on first use), else the stock one. The patched build runs standard types identically."""
    return find_llama("patched" if _custom_names(path) else "stock")


def custom_type_note(path: str | Path) -> str | None:
    """One line for a GGUF file stock llama.cpp cannot load (it holds qrealign's custom tensor types), else None."""
    names = _custom_names(path)
    if not names:
        return None
    from ..formats.types import qtype

    ids = ", ".join(f"{n} (type id {qtype(n).id})" for n in names)
    return (f"{Path(path).name} uses qrealign-gguf's custom tensor type {ids}, which stock llama.cpp rejects "
            f"(\"invalid ggml type\"); run it with `qrealign-gguf run {path}` (llama.cpp with native/llama_patches)")
