"""The real model end to end: SmolLM2-135M-Instruct (from PyPI) -> our Q4_K_M -> pinned llama.cpp answers."""
from __future__ import annotations

import subprocess

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from qrealign_gguf.cli import app
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


def test_smollm2_realigned_q4km_runs_in_llama(q4km, llama, tmp_path):
    """The mission's path on a real model, through the CLI a user runs: probe -> convert --probes -> llama.cpp.
    SmolLM2 serves as its own aligned model; 2 steps on 4 prompts per layer keep it a few minutes on 2 cores.
    The realignment checks its packed bytes against the simulator itself; here: the file is marked, differs from
    plain Q4_K_M where the optimizer moved the rounding, and still answers in the pinned llama.cpp."""
    runner = CliRunner()
    probes, out = tmp_path / "probes.safetensors", tmp_path / "realigned.gguf"
    r = runner.invoke(app, ["probe", str(smollm2_dir()), "-o", str(probes), "--samples", "16"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["convert", str(smollm2_dir()), "--probes", str(probes), "-o", str(out), "--outtype",
                            "Q4_K_M", "--realign-samples", "4", "--realign-iters", "2"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "realigned.realign-ckpt").exists()  # checkpoints are removed on success

    reader, plain = gguf.GGUFReader(out), gguf.GGUFReader(q4km)
    assert reader.fields["qrealign.realigned"].contents() is True
    ours, theirs = {t.name: t for t in reader.tensors}, {t.name: t for t in plain.tensors}
    assert {k: t.tensor_type for k, t in ours.items()} == {k: t.tensor_type for k, t in theirs.items()}  # same mix
    moved = [k for k in ours if k.startswith("blk.") and not np.array_equal(ours[k].data, theirs[k].data)]
    assert len(moved) > 30, moved  # most of the 210 layer matrices got different blocks
    answer = _chat(llama, out, "What is the capital of France? Answer in one sentence.")
    assert "Paris" in answer, answer
