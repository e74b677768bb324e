"""`torchrun --nproc-per-node 2 -m qrealign_gguf probe ...` on tiny llamas (gloo, one thread per rank): each rank
runs its half of the prompts, the states are gathered back in prompt order and every rank fits the same probes;
rank 0 alone writes. Two 2-rank runs fit the same probes (every number equal). Against one process the states
differ only in float order (a rank batches 4 prompts where one process batches 8, so padding and matmul shapes
differ), hence the probes are compared with a tolerance. An existing output without --force stops every rank
before any work."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dist_job
from qrealign_gguf.api import probe_model
from qrealign_gguf.realign.probes import ProbeSet
from tiny_models import make_tiny_llama

N = 8
pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("dp-probe")
    return make_tiny_llama(d / "aligned", layers=2, seed=0), make_tiny_llama(d / "finetuned", layers=2, seed=1)


def probe_args(aligned: Path, out: Path, contrast: Path | None) -> list[str]:
    extra = ["--contrast", str(contrast)] if contrast is not None else []
    return ["probe", str(aligned), "-o", str(out), "--samples", str(N), "--min-acc", "0.5", *extra]


@pytest.mark.parametrize("kind", ["content", "contrast"])
def test_two_ranks_write_once_deterministic_and_close_to_one_rank(models: tuple[Path, Path], tmp_path: Path,
                                                                   kind: str) -> None:
    aligned, finetuned = models
    contrast = finetuned if kind == "contrast" else None
    runs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        r = dist_job.launch(["-m", "qrealign_gguf", *probe_args(aligned, out, contrast)], 300, f"torchrun probe {name}")
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(re.findall(r"^wrote ", r.stdout, re.M)) == 1, r.stdout  # rank 0 alone reports and writes
        runs.append(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    a, b = ProbeSet.load(runs[0]), ProbeSet.load(runs[1])  # (safetensors orders its metadata by a hash map: not bytes)
    assert a.digest() == b.digest() and a.meta == b.meta and a.reliable == b.reliable  # same N, same probes

    torch.set_num_threads(1)
    one = probe_model(aligned, tmp_path / "one.safetensors", samples=N, min_acc=0.5, contrast=contrast)
    two = ProbeSet.load(runs[0])
    assert two.meta["kind"] == kind and two.meta == one.meta
    for f in ("mean", "std", "w", "b", "target", "target_benign"):  # states equal up to float summation order
        torch.testing.assert_close(getattr(two, f), getattr(one, f), rtol=1e-3, atol=1e-3, msg=f)
    assert two.reliable == one.reliable
    assert torch.equal(two.heldout_acc, one.heldout_acc)


def test_existing_output_stops_every_rank_before_work(models: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"keep me")
    r = dist_job.launch(["-m", "qrealign_gguf", *probe_args(models[0], out, None)], 300, "torchrun probe (exists)")
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stdout + r.stderr
    assert "--force" in lines[0] and "probe states" not in r.stdout + r.stderr
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]
