"""`torchrun --nproc-per-node 2 -m qrealign_gguf convert ... --probes ... --calib ... --equalize` end to end on a
tiny llama (gloo, one thread per rank): a valid file, the same bytes run after run, close to the 1-rank file;
ranks started with different arguments stop before anything is written; a rank killed mid-layer ends the job with
one line and the rerun continues from rank 0's checkpoints to the same bytes as an uninterrupted run.

Tolerance against one process: the ranks pad and sum their own prompts, so the imatrix, the equalization
statistics and every gradient equal the 1-rank ones only up to float summation order (tests/test_distributed.py
measures each); the last-bit differences flip the few rounding choices that sit on a threshold, and each layer's
input then carries them on. So per realigned tensor ||dequant_2 - dequant_1|| / ||dequant_1|| must stay under CLOSE_RTOL,
a fifth of Q4_0's own relative error (~0.1), the other tensors agree to float32 rounding, and the logits of the two
files agree far better than either agrees with the float model.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import dist_job
from qrealign_gguf.api import ConvertJob, convert_model
from qrealign_gguf.realign.options import RealignOptions
from tiny_models import make_tiny_llama, planted_probes

ROOT = Path(__file__).resolve().parents[1]
N = 8
ARGS = ["--outtype", "Q4_0", "--realign-samples", str(N), "--realign-iters", "8", "--equalize", "--calib",
        "builtin:benign", "--calib-samples", str(N), "--threads", "1"]
CLOSE_RTOL = 0.02  # per realigned tensor, ||dequant_2 - dequant_1|| / ||dequant_1||; Q4_0's own error is ~0.1

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("dp")
    model = make_tiny_llama(d / "hf", hidden=64, inter=128, layers=2)
    probes = d / "planted.safetensors"
    planted_probes(model, N, target_benign=0.0).save(probes)
    return model, probes


def torchrun(args: list[str], *, script: list[str] | None = None, limit_s: float = 300) -> subprocess.CompletedProcess:
    """torchrun --standalone --nproc-per-node 2 [script | -m qrealign_gguf] ARGS, one thread per rank; killed whole
    past the limit."""
    return dist_job.launch([*(script or ["-m", "qrealign_gguf"]), *args], limit_s, f"torchrun {' '.join(args[:2])}")


def _errors_and_codes(r: subprocess.CompletedProcess) -> tuple[list[str], dict[int, int]]:
    text = r.stdout + r.stderr
    codes = {int(a): int(b) for a, b in re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text)}
    return [ln for ln in text.splitlines() if ln.startswith("error:")], codes


def _no_rank_traceback(r: subprocess.CompletedProcess) -> None:
    text = r.stdout + r.stderr
    assert not re.search(r"^\[rank\d+\]:", text, re.M), text
    assert "qrealign_gguf" not in "\n".join(ln for ln in text.splitlines() if ln.strip().startswith("File ")), text


def _tensors(path: Path) -> dict[str, tuple[bytes, np.ndarray]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.data.tobytes(), gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1))
            for t in r.tensors}


@pytest.fixture(scope="module")
def two_rank_runs(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    model, probes = tiny
    d = tmp_path_factory.mktemp("runs")
    outs = []
    for name in ("a.gguf", "b.gguf"):
        r = torchrun(["convert", str(model), "-o", str(d / name), "--probes", str(probes), *ARGS,
                      "--save-imatrix", str(d / f"{name}.imatrix")])
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(re.findall(r"^wrote ", r.stdout, re.M)) == 1, r.stdout  # rank 0 alone reports (and writes)
        assert not (d / name).with_suffix(".realign-ckpt").exists()  # removed once the file is verified
        assert sorted(p.name for p in d.iterdir()) == sorted(n for o in [*outs, d / name] for n in (o.name, f"{o.name}.imatrix"))
        outs.append(d / name)
    return outs[0], outs[1]


def test_two_ranks_valid_deterministic_and_close_to_one_rank(tiny: tuple[Path, Path], two_rank_runs: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    model, probes = tiny
    a, b = two_rank_runs
    assert a.read_bytes() == b.read_bytes()  # same N, same bytes

    one = tmp_path / "one.gguf"
    torch.set_num_threads(1)
    convert_model(ConvertJob(model=model, output=one, outtype="Q4_0", calib="builtin:benign", calib_samples=N,
                             threads=1, realign=RealignOptions(probes=probes, samples=N, iters=8, equalize=True),
                             save_imatrix=tmp_path / "one.imatrix"))
    from qrealign_gguf.imatrix import load_imatrix
    im1, im2 = load_imatrix(tmp_path / "one.imatrix"), load_imatrix(Path(f"{a}.imatrix"))  # sums of all N prompts
    assert im1.keys() == im2.keys() and im1
    for name in im1:  # float32 sums in another order, token count exact
        np.testing.assert_allclose(im2[name], im1[name], rtol=1e-5, err_msg=name)
    t1, t2 = _tensors(one), _tensors(a)
    assert t1.keys() == t2.keys()
    realigned = [n for n in t1 if re.fullmatch(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight", n)]
    assert len(realigned) == 14
    for name in realigned:
        (raw1, d1), (raw2, d2) = t1[name], t2[name]
        rel = float(np.linalg.norm(d2 - d1) / np.linalg.norm(d1))
        assert rel <= CLOSE_RTOL, f"{name}: the 2-rank tensor differs by {rel:.4f} of its norm from the 1-rank one"
    for name in set(t1) - set(realigned):  # embedding, norms: not learned (norms rescaled by equalization)
        np.testing.assert_allclose(t2[name][1], t1[name][1], rtol=1e-5, atol=1e-6, err_msg=name)

    from qrealign_gguf.llamacpp import logits
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    l1, l2 = logits(one, ids), logits(a, ids)
    assert np.isfinite(l2).all()
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(l2 - l1).mean() < 0.5 * np.abs(l1 - ref).mean()


def test_ranks_with_different_arguments_write_nothing(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, probes = tiny
    out = tmp_path / "m.gguf"
    # torchrun starts every rank with the same command: a shell gives rank 1 another --realign-iters
    line = " ".join([sys.executable, "-m", "qrealign_gguf", "convert", str(model), "-o", str(out), "--probes",
                     str(probes), *ARGS, "--realign-iters", '"$((8 + RANK))"'])
    r = torchrun(["sh", "-c", f"exec {line}"], script=["--no-python"])
    errors, codes = _errors_and_codes(r)
    assert r.returncode != 0
    assert codes == {0: 2, 1: 2}, r.stderr
    assert len(errors) == 1, r.stdout + r.stderr
    assert "different arguments" in errors[0] and "realign.iters is 8 on rank 0 but 9 on rank 1" in errors[0], errors
    _no_rank_traceback(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file, no partial, no checkpoints


def test_killed_rank_then_resume_gives_the_uninterrupted_bytes(tiny: tuple[Path, Path],
                                                               two_rank_runs: tuple[Path, Path], tmp_path: Path) -> None:
    model, probes = tiny
    out = tmp_path / "k.gguf"
    args = ["convert", str(model), "-o", str(out), "--probes", str(probes), *ARGS]
    r = torchrun(args, script=[str(ROOT / "tests" / "dist_kill_convert.py")])
    errors, codes = _errors_and_codes(r)
    assert r.returncode != 0
    assert codes.get(1) == -9 and codes.get(0) == 2, r.stderr
    assert len(errors) == 1, r.stdout + r.stderr
    assert "checkpoints" in errors[0], errors
    _no_rank_traceback(r)
    ckpt = out.with_suffix(".realign-ckpt")
    assert not out.exists() and not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["fingerprint.json", "layer_000.safetensors"]

    again = torchrun(args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(r"blk\.0 \(1/2\) \[checkpoint\]", again.stdout + again.stderr), again.stdout + again.stderr
    assert out.read_bytes() == two_rank_runs[0].read_bytes()
