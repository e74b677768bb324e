"""The real model end to end: SmolLM2-135M-Instruct (from PyPI) -> our Q4_K_M -> pinned llama.cpp answers."""
from __future__ import annotations

import subprocess

import gguf
import pytest

from qrealign_gguf.convert import ConvertOptions, convert
from tiny_models import smollm2_dir


@pytest.fixture(scope="module")
def q4km(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "smollm2-Q4_K_M.gguf"
    convert(smollm2_dir(), out, ConvertOptions(outtype="Q4_K_M"))
    return out


def _chat(llama, model, prompt: str, n: int = 48) -> str:
    r = subprocess.run([str(llama.bin("llama-completion")), "-m", str(model), "-p", prompt, "-cnv", "-st", "-n", str(n),
                        "--temp", "0", "--simple-io", "--no-warmup", "--no-display-prompt", "-t", "2"],
                       env=llama.env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_smollm2_q4km_answers_coherently(q4km, llama):
    types = {t.tensor_type.name for t in gguf.GGUFReader(q4km).tensors}
    assert types >= {"Q5_0", "Q8_0", "F32"}  # 576-wide rows fall back from Q4_K exactly as llama-quantize does
    answer = _chat(llama, q4km, "What is the capital of France? Answer in one sentence.")
    assert "Paris" in answer, answer
