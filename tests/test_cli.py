"""Bad input: one line on stderr, exit code != 0, never a partial output file."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from qrealign_gguf.cli import app
from qrealign_gguf.convert import ConvertOptions, convert
from qrealign_gguf.errors import InputError
from qrealign_gguf.imatrix import save_imatrix
from tiny_models import make_tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


def _copy(tiny: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny, d)
    return d


def _fails(args: list[str], match: str) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code != 0, r.output
    msg = r.stderr.strip() if hasattr(r, "stderr") else r.output.strip()
    assert "Traceback" not in r.output
    assert len(msg.splitlines()) == 1, msg
    assert match in msg, msg
    return msg


def _no_gguf(d: Path) -> None:
    """Neither the output nor a leftover temporary directory."""
    assert not (d / "o.gguf").exists()
    assert not [p for p in d.rglob("*") if ".partial" in p.name]


def test_missing_config(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    (d / "config.json").unlink()
    _fails(["convert", str(d), "-o", str(tmp_path / "o.gguf")], "no config.json")
    _no_gguf(tmp_path)


def test_unsupported_architecture(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _fails(["convert", str(d), "-o", str(tmp_path / "o.gguf")], "GPT2LMHeadModel")
    assert "LlamaForCausalLM" in msg  # lists what is supported
    _no_gguf(tmp_path)


def test_truncated_safetensors(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails(["convert", str(d), "-o", str(tmp_path / "o.gguf")], "truncated")
    _no_gguf(tmp_path)


def test_garbage_safetensors(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    _fails(["convert", str(d), "-o", str(tmp_path / "o.gguf")], "safetensors")


def test_nan_weights(tiny, tmp_path):
    d = _copy(tiny, tmp_path)
    tensors = load_file(d / "model.safetensors")
    name = next(k for k in tensors if "layers.1.mlp.down_proj" in k)  # late tensor: the header is already written
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = np.nan
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    _fails(["convert", str(d), "-o", str(tmp_path / "o.gguf"), "--outtype", "Q8_0"], "NaN")
    _no_gguf(tmp_path)


def test_existing_output_needs_force(tiny, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    _fails(["convert", str(tiny), "-o", str(out)], "--force")
    assert out.read_bytes() == b"keep me"
    r = runner.invoke(app, ["convert", str(tiny), "-o", str(out), "--force", "--outtype", "Q8_0"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:4] == b"GGUF"


def test_unwritable_output(tiny, tmp_path):
    _fails(["convert", str(tiny), "-o", str(tmp_path / "nope" / "o.gguf")], "does not exist")
    if os.geteuid() == 0:
        pytest.skip("running as root: directory permission bits are not enforced")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(["convert", str(tiny), "-o", str(ro / "o.gguf")], "permission")
    finally:
        ro.chmod(0o700)


def test_bad_outtype(tiny, tmp_path):
    _fails(["convert", str(tiny), "-o", str(tmp_path / "o.gguf"), "--outtype", "Q7_X"], "choose one of")


def test_imatrix_of_wrong_model(tiny, tmp_path):
    im = tmp_path / "wrong.imatrix.gguf"
    save_imatrix(im, {"blk.0.attn_q.weight": np.ones(999, np.float32)}, 100, ["x"])
    _fails(["convert", str(tiny), "-o", str(tmp_path / "o.gguf"), "--outtype", "Q4_K_M", "--imatrix", str(im)],
           "does not match")
    other = tmp_path / "other.imatrix.gguf"
    save_imatrix(other, {"model.unrelated.weight": np.ones(64, np.float32)}, 100, ["x"])
    _fails(["convert", str(tiny), "-o", str(tmp_path / "o.gguf"), "--imatrix", str(other)], "names none")
    _no_gguf(tmp_path)


def test_interrupted_write_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "o.gguf"

    def interrupt(name, i, n, done, total):
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny, out, ConvertOptions(outtype="Q8_0"), progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_writes_nothing(tiny, tmp_path):
    r = runner.invoke(app, ["convert", str(tiny), "-o", str(tmp_path), "--outtype", "Q4_K_M", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "bits per weight" in r.output and "blk.0.attn_q.weight" in r.output
    assert list(tmp_path.iterdir()) == []


def test_default_name_and_inspect(tiny, tmp_path):
    r = runner.invoke(app, ["convert", str(tiny), "-o", str(tmp_path), "--outtype", "Q8_0"])
    assert r.exit_code == 0, r.output
    (f,) = tmp_path.glob("*.gguf")
    assert f.name.startswith("hf-") and f.name.endswith("-Q8_0.gguf")
    r = runner.invoke(app, ["inspect", str(f)])
    assert r.exit_code == 0, r.output
    assert "general.quantized_by" in r.output and "qrealign.version" in r.output and "Q8_0" in r.output


def test_metadata_override_and_split(tiny, tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"general.name": "Renamed", "general.license": "apache-2.0"}))
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    r = runner.invoke(app, ["convert", str(tiny), "-o", str(out), "--outtype", "Q8_0", "--metadata", str(meta),
                            "--split-max-size", "2M"])
    assert r.exit_code == 0, r.output
    shards = sorted(out.parent.glob("m-*-of-*.gguf"))
    assert len(shards) >= 2
    import gguf
    first = gguf.GGUFReader(shards[0])
    assert first.fields["general.name"].contents() == "Renamed"


def test_inspect_bad_file(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"not a gguf")
    _fails(["inspect", str(f)], "not a readable GGUF")


def test_device_cuda_without_a_gpu(tiny, tmp_path):
    from qrealign_gguf.formats import cuda_codec

    if cuda_codec.available():
        pytest.skip("a CUDA device is available here; the error path cannot be exercised")
    _fails(["convert", str(tiny), "-o", str(tmp_path / "o.gguf"), "--outtype", "Q4_0", "--device", "cuda"], "--device cuda")
    _no_gguf(tmp_path)
    r = runner.invoke(app, ["convert", str(tiny), "-o", str(tmp_path / "o.gguf"), "--outtype", "Q4_0", "--device", "auto"])
    assert r.exit_code == 0, r.output  # auto falls back to the C codec


@pytest.mark.parametrize("outtype, warned", [("Q8_0", True), ("Q4_K_M", False)])
def test_realigning_to_q8_0_says_rounding_has_little_room(tiny, tmp_path, outtype, warned):
    """Realigned Q8_0 restored almost no refusal (measured); asking for it gets the caveat, Q4_K_M does not."""
    r = runner.invoke(app, ["convert", str(tiny), "-o", str(tmp_path), "--outtype", outtype, "--dry-run",
                            "--probes", str(tmp_path / "probes.safetensors")])
    assert r.exit_code == 0, r.output
    assert ("little room to realign" in r.output) == warned, r.output
    plain = runner.invoke(app, ["convert", str(tiny), "-o", str(tmp_path), "--outtype", outtype, "--dry-run"])
    assert "little room to realign" not in plain.output  # not realigning: nothing to warn about


def test_realignment_plan_in_dry_run_and_a_run_that_cannot_fit_stops_first(tiny, tmp_path, monkeypatch):
    """--dry-run with realignment prints memory per rank and time; a real run whose plan exceeds the free memory
    stops before any work with one line naming the numbers, and writes nothing."""
    from qrealign_gguf.realign import budget
    from tiny_models import planted_probes

    probes = tmp_path / "probes.safetensors"
    planted_probes(tiny, 4, target_benign=0.0).save(probes)
    out = tmp_path / "out"
    out.mkdir()
    args = ["convert", str(tiny), "-o", str(out / "m.gguf"), "--outtype", "Q4_0", "--probes", str(probes),
            "--realign-samples", "4", "--realign-iters", "2", "--threads", "1"]
    r = runner.invoke(app, args + ["--dry-run"])
    assert r.exit_code == 0, r.output
    assert "realignment on cpu, 1 rank(s)" in r.output and "fits" in r.output and "per layer" in r.output
    monkeypatch.setattr(budget, "available_host_bytes", lambda: 1 << 20)  # 1 MiB free
    msg = _fails(args, "realignment needs")
    assert "GiB is available" in msg and "try" in msg
    assert list(out.iterdir()) == []
