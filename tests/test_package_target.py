"""`qrealign-gguf package --target host|linux-aarch64`: the bundle carries static llama.cpp for the device (patched
for custom types) and a run.sh; unpacked into an empty directory it verifies with `sha256sum -c` and answers a
prompt with nothing else installed -- on this machine (host), under qemu-aarch64 (linux-aarch64). Bad targets and a
missing cross compiler fail in one line with nothing written.

The refusals run everywhere (`make test`); the bundles that answer need the static patched builds (tests/edge.py),
which `make edge-check` makes (and `make test` uses when cached); otherwise they skip and say so.
"""
from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from qrealign_gguf.api import package_model
from qrealign_gguf.convert import ConvertOptions, convert
from edge import QEMU, static_build
from hostile import assert_refused, run_cli, snapshot
from tiny_models import make_tiny_llama

EM_X86_64, EM_AARCH64 = 62, 183


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkg_target")
    hf = make_tiny_llama(d / "hf", hidden=384, inter=640, layers=2, heads=6, kv_heads=2, tie=False)
    q8 = convert(hf, d / "tiny-Q8_0.gguf", ConvertOptions(outtype="Q8_0")).files[0]
    qr = convert(hf, d / "tiny-QR4_K_M.qrealign.gguf", ConvertOptions(outtype="QR4_K_M")).files[0]
    return {"dir": d, "q8": q8, "qr": qr}


def _elf(path: Path) -> tuple[int, bool]:
    """(e_machine, statically linked): a static program has no PT_INTERP (no dynamic loader to find)."""
    b = path.read_bytes()
    assert b[:4] == b"\x7fELF" and b[4] == 2, "not a 64-bit ELF"
    machine = struct.unpack_from("<H", b, 18)[0]
    phoff, phentsize, phnum = struct.unpack_from("<Q", b, 32)[0], *struct.unpack_from("<HH", b, 54)
    types = [struct.unpack_from("<I", b, phoff + i * phentsize)[0] for i in range(phnum)]
    return machine, 3 not in types  # PT_INTERP = 3


def _unpack(bundle: Path, dest: Path) -> Path:
    """What a device does: tar xf into an empty directory, then sha256sum -c; returns the bundle's folder."""
    dest.mkdir()
    subprocess.run(["tar", "xf", str(bundle), "-C", str(dest)], check=True)
    (stem,) = dest.iterdir()
    r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=stem, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    checked = {ln.rsplit(":", 1)[0] for ln in r.stdout.splitlines() if ln.endswith(": OK")}
    assert {"run.sh", "bin/llama-completion", "provenance.json", "README.md"} <= checked, checked
    return stem


def _bare_env(**extra: str) -> dict[str, str]:
    """A device's environment: no LD_LIBRARY_PATH to our builds, no venv, system PATH only."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **extra}


def test_unknown_target_refused(models, tmp_path) -> None:
    before = snapshot(tmp_path, models["dir"])
    r = run_cli(["package", models["q8"], "-o", tmp_path / "b.tar", "--target", "riscv64"])
    line = assert_refused(r, before, tmp_path, models["dir"], match="unknown target 'riscv64'")
    assert "host" in line and "linux-aarch64" in line


def test_missing_cross_compiler_refused(models, tmp_path) -> None:
    """A machine without aarch64-linux-gnu-g++: one line saying what to install, before anything is written."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "cmake", "c++"):  # everything but the cross compiler
        if (Path("/usr/bin") / tool).exists():
            (bindir / tool).symlink_to(Path("/usr/bin") / tool)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out, models["dir"])
    r = run_cli(["package", models["qr"], "-o", out / "b.tar", "--target", "linux-aarch64"], env={"PATH": str(bindir)})
    assert_refused(r, before, out, models["dir"], match="aarch64-linux-gnu-g++")
    assert "apt-get install g++-aarch64-linux-gnu" in r.stderr


def test_host_bundle_answers(models, tmp_path) -> None:
    """A QR5_K128 file for this machine: static patched llama.cpp; unpacked into an empty directory, run.sh answers
    with a bare environment (no venv, no LD_LIBRARY_PATH, system PATH only)."""
    prefix = static_build("patched", "host")
    bundle = package_model(models["qr"], tmp_path / "host.tar", target="host")
    stem = _unpack(bundle, tmp_path / "device")
    machine = EM_AARCH64 if platform.machine() == "aarch64" else EM_X86_64
    assert _elf(stem / "bin" / "llama-completion") == (machine, True)
    assert (stem / "bin" / "llama-completion").read_bytes() == (prefix / "bin" / "llama-completion").read_bytes()
    prov = json.loads((stem / "provenance.json").read_text())
    assert prov["target"]["name"] == "host" and prov["target"]["llama_cpp"] == "patched"
    assert prov["custom_types"] == ["QR5_K128"]
    assert "./run.sh" in (stem / "README.md").read_text()
    r = subprocess.run(["./run.sh", "Hello", "-n", "8"], cwd=stem, capture_output=True, text=True, timeout=300,
                       env=_bare_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), r.stderr[-3000:]  # the answer (a random tiny model: 8 tokens of noise)
    # a stock llama.cpp would have refused the file ("invalid ggml type"): the bundled one is the patched build


def test_aarch64_bundle_answers_under_qemu(models, tmp_path) -> None:
    """A QR5_K128 file for linux-aarch64: the patched static ARM build; run.sh answers under qemu-aarch64, and on
    this x86 machine run.sh refuses in one sentence instead of "Exec format error"."""
    prefix = static_build("patched", "linux-aarch64")
    bundle = package_model(models["qr"], tmp_path / "arm.tar", target="linux-aarch64")
    with tarfile.open(bundle) as tar:
        modes = {m.name.split("/", 1)[1]: m.mode for m in tar.getmembers()}
    assert modes["run.sh"] == modes["bin/llama-completion"] == 0o755 and modes["README.md"] == 0o644
    stem = _unpack(bundle, tmp_path / "device")
    assert _elf(stem / "bin" / "llama-completion") == (EM_AARCH64, True)
    assert (stem / "bin" / "llama-completion").read_bytes() == (prefix / "bin" / "llama-completion").read_bytes()
    prov = json.loads((stem / "provenance.json").read_text())
    assert prov["target"]["name"] == "linux-aarch64" and prov["target"]["llama_cpp"] == "patched"
    assert prov["target"]["cpu_flags"] == ["asimddp"] and prov["custom_types"] == ["QR5_K128"]
    assert (stem / "BUILD.md").exists()  # the patches still travel, for devices the bundled build does not fit
    r = subprocess.run(["./run.sh", "Hello", "-n", "8"], cwd=stem, capture_output=True, text=True, timeout=600,
                       env=_bare_env(EMULATOR=" ".join(QEMU)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), r.stderr[-3000:]
    assert "NEON = 1" in r.stderr and "DOTPROD = 1" in r.stderr, r.stderr[-3000:]  # the ARM build's system_info
    assert "DEPRECATED" not in r.stderr  # run.sh's default -n gave way to the one passed
    wrong = subprocess.run(["./run.sh", "Hello"], cwd=stem, capture_output=True, text=True, timeout=60, env=_bare_env())
    assert wrong.returncode == 2 and "built for aarch64" in wrong.stderr and len(wrong.stderr.splitlines()) == 1


def test_bundle_with_target_is_reproducible(models, tmp_path) -> None:
    """Packaging twice gives the same bytes (the programs carry the GGUF's mtime like every member)."""
    static_build("patched", "linux-aarch64")
    a = package_model(models["qr"], tmp_path / "a.tar", target="linux-aarch64")
    b = package_model(models["qr"], tmp_path / "b.tar", target="linux-aarch64")
    assert a.read_bytes() == b.read_bytes()
