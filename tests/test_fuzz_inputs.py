"""The mutation fuzzer of tests/fuzz_inputs.py as part of `make test`: a few hundred mutants per format, in a child
process under a memory cap and a time limit. `make fuzz` runs the long campaign (more cases, several seeds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CASES = int(os.environ.get("QREALIGN_FUZZ_CASES", "300"))


def _campaign(fmt: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{fmt}.json"
    cmd = f"ulimit -v {4 * 1024 * 1024}; exec \"$0\" \"$@\""
    p = subprocess.run(["bash", "-c", cmd, sys.executable, str(HERE / "fuzz_inputs.py"), fmt, "--cases", str(CASES),
                        "--seed", "7", "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=600)
    assert out.exists(), f"the fuzz driver died (exit {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(out.read_text())


def _check(res: dict) -> None:
    assert not res["crashes"], "readers raised something other than InputError:\n" + "\n".join(res["crashes"][:20])
    assert not res["accepted_but_reference_rejects"], (
        "accepted files the reference reader rejects:\n" + "\n".join(res["accepted_but_reference_rejects"][:20]))
    assert not res["wrong_values"], f"accepted with other values than the reference: {res['wrong_values'][:20]}"
    # the campaign is not vacuous: mutants of both kinds reached the readers
    assert res["accepted"] >= 0.03 * res["cases"] and res["rejected"] >= 0.3 * res["cases"], res


def test_safetensors_mutants(tmp_path):
    _check(_campaign("safetensors", tmp_path))


def test_gguf_mutants(tmp_path, llama):
    lib = llama.lib_dir / "libggml-base.so"
    if not lib.exists():
        pytest.skip(f"no {lib}")
    _check(_campaign("gguf", tmp_path, "--ggml-lib", str(lib)))
