"""Layer-wise onloading (realign/onload.py): the files it writes are byte for byte those of the whole-model path it
replaced (tests/whole_model.py, the oracle), peak memory does not grow with depth, and a bad --offload-dir is one
line and exit 2 before any work.

The oracle is put in place of the layer-wise functions with monkeypatch, and every comparison runs the real CLI in
this process on the same inputs into a fresh folder, so the whole file is compared: tensors, realigned blocks,
equalized norms and biases, and the metadata."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hostile import assert_refused, run_cli, snapshot
from qrealign_gguf import calib
from qrealign_gguf.cli import app
from qrealign_gguf.realign import hidden, pipeline
from qrealign_gguf.realign.onload import gather_rows, row_spans
from tiny_models import make_tiny_llama, make_tiny_qwen2, planted_probes
from whole_model import WholeModelSource, whole_model_importance, whole_model_last_token_states

runner = CliRunner()
MAKERS = {"qwen2": make_tiny_qwen2, "llama": make_tiny_llama}
# (family, checkpoint dtype, outtype, activations spilled to --offload-dir in the layer-wise run)
CASES = [("qwen2", torch.bfloat16, "Q4_K_M", True), ("llama", torch.float32, "Q4_0", False)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{str(c[1]).removeprefix('torch.')}")
def case(request, tmp_path_factory) -> tuple[Path, Path, str, bool]:
    """(fine-tuned model, an 'aligned' model of the same shape, outtype, offload)."""
    family, dtype, outtype, offload = request.param
    d = tmp_path_factory.mktemp(family)
    ft = MAKERS[family](d / "ft", hidden=64, inter=128, layers=3, dtype=dtype)
    aligned = MAKERS[family](d / "aligned", hidden=64, inter=128, layers=3, seed=1, dtype=dtype)
    return ft, aligned, outtype, offload


class Oracle:
    """Puts the whole-model path in place of the layer-wise one and counts its calls (so a test can tell that the
    oracle really ran, and did not compare the layer-wise path with itself)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, int] = {}

        def counted(name, fn):  # noqa: ANN001, ANN202
            def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
                self.calls[name] = self.calls.get(name, 0) + 1
                return fn(*a, **k)
            return wrapper

        monkeypatch.setattr(pipeline, "LayerwiseSource", counted("source", WholeModelSource))
        monkeypatch.setattr(calib, "compute_importance", counted("imatrix", whole_model_importance))
        monkeypatch.setattr(hidden, "layerwise_last_token_states", counted("states", whole_model_last_token_states))


def _ok(args: list[str | Path]) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)


def _same_file(a: Path, b: Path) -> None:
    x, y = a.read_bytes(), b.read_bytes()
    assert len(x) == len(y), (a, len(x), b, len(y))
    if x != y:
        first = next(i for i in range(len(x)) if x[i] != y[i])
        pytest.fail(f"{a} and {b} differ first at byte {first} of {len(x)}")


def _same_probes(a: Path, b: Path) -> None:
    """Same metadata and every tensor bit for bit. Not the raw bytes: the safetensors writer orders the metadata
    keys as a Rust HashMap iterates them, differently in every process (two saves by the same code differ)."""
    from safetensors import safe_open

    with safe_open(str(a), framework="numpy") as x, safe_open(str(b), framework="numpy") as y:
        assert x.metadata() == y.metadata()
        assert sorted(x.keys()) == sorted(y.keys())
        for k in x.keys():  # noqa: SIM118 - safe_open is no Mapping
            u, v = x.get_tensor(k), y.get_tensor(k)
            assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), k


def _convert(case, probes: Path, out: Path, offload: Path | None) -> None:  # noqa: ANN001
    ft, _, outtype, _ = case
    out.mkdir()
    args = ["convert", ft, "-o", out / "o.gguf", "--outtype", outtype, "--probes", probes,
            "--realign-samples", "6", "--realign-iters", "3", "--equalize",
            "--calib", "builtin:benign", "--calib-samples", "5", "--save-imatrix", out / "imatrix.gguf"]
    _ok(args + (["--offload-dir", offload] if offload is not None else []))


def test_realigning_convert_matches_the_whole_model_path(case, tmp_path, monkeypatch):
    """`convert --probes --equalize --calib --save-imatrix`: the same GGUF and the same imatrix, bit for bit."""
    ft, _, _, offload = case
    probes = tmp_path / "planted.safetensors"
    planted_probes(ft, 6, target_benign=0.0).save(probes)
    spill = tmp_path / "offload" if offload else None
    _convert(case, probes, tmp_path / "layerwise", spill)
    if spill is not None:  # the run's private folder is removed, the folder the user named is left
        assert spill.is_dir() and not any(spill.iterdir())
    with monkeypatch.context() as m:
        oracle = Oracle(m)
        _convert(case, probes, tmp_path / "whole", None)
    assert oracle.calls == {"source": 1, "imatrix": 1}
    _same_file(tmp_path / "layerwise" / "imatrix.gguf", tmp_path / "whole" / "imatrix.gguf")
    _same_file(tmp_path / "layerwise" / "o.gguf", tmp_path / "whole" / "o.gguf")


@pytest.mark.parametrize("kind", ["content", "contrast"])
def test_probe_files_match_the_whole_model_path(case, kind, tmp_path, monkeypatch):
    """`probe` (content probes on the aligned model; contrast: aligned vs fine-tuned): the same probes."""
    ft, aligned, _, offload = case
    extra = ["--contrast", ft] if kind == "contrast" else []
    spill = ["--offload-dir", tmp_path / "offload"] if offload else []
    _ok(["probe", aligned, "-o", tmp_path / "layerwise.safetensors", "--samples", "10", *extra, *spill])
    with monkeypatch.context() as m:
        oracle = Oracle(m)
        _ok(["probe", aligned, "-o", tmp_path / "whole.safetensors", "--samples", "10", *extra])
    assert oracle.calls == {"states": 2 if kind == "contrast" else 1}
    _same_probes(tmp_path / "layerwise.safetensors", tmp_path / "whole.safetensors")


def test_quantized_embedding_rows_are_the_whole_matrix_rows(tmp_path):
    """Layer 0's quantized-prefix input needs the token embedding as the file stores it, but only the rows of the
    prompts' tokens: every block type encodes a row on its own (the imatrix is per column), so encoding those rows
    gives exactly those rows of the whole matrix's encoding (what the whole-model path encoded)."""
    from dataclasses import replace

    from qrealign_gguf.formats.types import QTYPES
    from qrealign_gguf.plan import make_plan
    from qrealign_gguf.realign.pipeline import _quantized_embedding

    d = make_tiny_llama(tmp_path / "m", hidden=256, inter=256, layers=1, heads=4, kv_heads=2)
    plan = make_plan(d, tmp_path / "o.gguf", "Q4_K_M")
    emb = next(t for t in plan.tensors if t.source.name == "token_embd.weight")
    n = emb.source.shape[0]
    rows = np.array([0, 1, 2, 40, 41, 500, 30000, n - 1])
    imatrix = {"token_embd.weight": np.random.default_rng(0).random(256).astype(np.float32) + 0.1}
    for q in ("F16", "BF16", "Q8_0", "Q4_0", "IQ4_NL", "Q4_K", "Q6_K", "QR5_K128"):
        one = replace(plan, tensors=[replace(emb, qtype=QTYPES[q])])
        for importance in ({}, imatrix) if q not in ("F16", "BF16") else ({},):
            sub = _quantized_embedding(one, importance, rows)
            whole = _quantized_embedding(one, importance, np.arange(n))
            assert sub is not None and torch.equal(sub, whole[torch.from_numpy(rows)]), (q, bool(importance))


def test_embedding_rows_read_in_spans():
    """The quantized embedding of the used tokens is read in merged spans and gathered in row order."""
    rows = np.array([0, 3, 30, 31, 200])
    assert row_spans(rows, gap=32) == [(0, 32), (200, 201)]
    m = np.arange(300 * 2).reshape(300, 2)
    reads: list[tuple[int, int]] = []

    def load_rows(r0: int, r1: int) -> np.ndarray:
        reads.append((r0, r1))
        return m[r0:r1]

    assert np.array_equal(gather_rows(load_rows, rows), m[rows])
    assert reads == [(0, 32), (200, 201)]


# -- memory: one layer, not the depth -----------------------------------------------------------------------------
HIDDEN, INTER, HEADS, KV = 512, 1536, 8, 2


def _layer_f32_bytes() -> int:
    head = HIDDEN // HEADS
    attn = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV * head
    return 4 * (attn + 3 * HIDDEN * INTER)


# The child reports its own high-water mark (VmHWM, per address space, fresh at exec). Not the rusage of the child:
# Linux carries the forking parent's RSS into it (the parent here holds the model it just built).
_HWM = """import atexit, os, runpy, sys
def hwm():
    with open("/proc/self/status") as f, open(os.environ["QREALIGN_TEST_HWM"], "w") as out:
        out.write(next(ln.split()[1] for ln in f if ln.startswith("VmHWM:")))
atexit.register(hwm)
sys.argv = ["qrealign-gguf", *sys.argv[1:]]
runpy.run_module("qrealign_gguf", run_name="__main__", alter_sys=True)
"""


def _peak_rss_mb(args: list[str | Path], log: Path) -> float:
    """Peak RSS of `python -m qrealign_gguf ARGS` in a child process, in MiB."""
    hwm = log.with_suffix(".hwm")
    with log.open("w") as fh:
        p = subprocess.run([sys.executable, "-c", _HWM, *map(str, args)], stdout=fh, stderr=fh, check=False,
                           env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "QREALIGN_TEST_HWM": str(hwm)})
    assert p.returncode == 0, log.read_text()[-3000:]
    return int(hwm.read_text()) / 1024  # kB


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """`probe` and a realigning `convert --calib` of 2- and 16-layer models (hidden 512, bf16 checkpoints): the
    16-layer runs peak within half of the 14 extra layers' float32 weights of the 2-layer runs. The whole-model
    path held every layer in float32 (`probe` measured +214 MiB from 2 to 16 layers); the layer-wise path holds one.
    A generous bound on purpose: allocator noise, not a timing."""
    peaks: dict[int, dict[str, float]] = {}
    for n in (2, 16):
        d = make_tiny_llama(tmp_path / f"l{n}", hidden=HIDDEN, inter=INTER, layers=n, heads=HEADS, kv_heads=KV,
                            dtype=torch.bfloat16)
        probes = tmp_path / f"p{n}.safetensors"
        peaks[n] = {
            "probe": _peak_rss_mb(["probe", d, "-o", probes, "--samples", "8", "--min-acc", "0"],
                                  tmp_path / f"probe{n}.log"),
            "convert": _peak_rss_mb(["convert", d, "-o", tmp_path / f"o{n}.gguf", "--outtype", "Q4_0",
                                     "--probes", probes, "--realign-samples", "4", "--realign-iters", "1",
                                     "--calib", "builtin:benign", "--calib-samples", "4"],
                                    tmp_path / f"convert{n}.log"),
        }
    extra = 14 * _layer_f32_bytes() / 2**20
    for what in ("probe", "convert"):
        grew = peaks[16][what] - peaks[2][what]
        print(f"{what}: peak RSS {peaks[2][what]:.0f} MiB (2 layers) -> {peaks[16][what]:.0f} MiB (16 layers); "
              f"14 layers' float32 weights {extra:.0f} MiB")
        assert grew < extra / 2, (what, peaks)


# -- a bad --offload-dir ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["convert", "probe"])
def test_unwritable_offload_dir_is_one_line(command, tmp_path):
    """A file where the directory should be (root may write anywhere else, so a permission test alone would not
    hold): exit 2, one line naming --offload-dir, and nothing created, changed or removed, before any model work."""
    ft = make_tiny_llama(tmp_path / "ft", hidden=64, inter=128, layers=2)
    work = tmp_path / "work"
    work.mkdir()
    (work / "blocker").write_text("a file, not a directory\n")
    out = work / ("o.gguf" if command == "convert" else "p.safetensors")

    def args(offload: Path) -> list[str | Path]:
        first = ["convert", ft, "--outtype", "Q4_0", "--aligned", ft] if command == "convert" else ["probe", ft]
        return [*first, "-o", out, "--offload-dir", offload]

    bad = [work / "blocker" / "spill", work / "blocker"]
    if os.geteuid() != 0:  # a read-only directory refuses everyone but root
        (work / "ro").mkdir(mode=0o500)
        bad.append(work / "ro")
    for offload in bad:
        before = snapshot(work, ft)
        line = assert_refused(run_cli(args(offload)), before, work, ft, match="--offload-dir")
        assert "not a writable directory" in line, line
