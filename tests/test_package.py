"""`qrealign-gguf package`: the bundle holds the unchanged GGUF, checksums that verify, provenance read from the file,
a model card; custom-type files carry the llama.cpp patches; bad input fails in one line with no bundle left over."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qrealign_gguf.cli import app
from qrealign_gguf.convert import ConvertOptions, convert
from tiny_models import make_tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkg")
    tiny = make_tiny_llama(d / "hf", hidden=256, inter=512, layers=1, heads=4, kv_heads=2, tie=False)
    q8 = d / "tiny-Q8_0.gguf"
    convert(tiny, q8, ConvertOptions(outtype="Q8_0", extra_provenance={"realigned": True, "realign_iters": 7}))
    ko = d / "tiny-QR4_KO.qrealign.gguf"
    convert(tiny, ko, ConvertOptions(outtype="QR4_KO"))
    return {"q8": q8, "ko": ko}


def _members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_bundle_contents_and_checksums(files, tmp_path) -> None:
    gguf = files["q8"]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"judge": {"primary": "keyword"}, "notes": [], "variants": [
        {"name": "x", "path": str(gguf), "harmful": {"n": 41, "refusal": 0.5}, "overrefusal": {"n": 25, "refusal": 0.04},
         "benign": {"n": 50, "answered": 1.0, "rouge_l": 0.7}, "kld": 0.015, "ppl": 3.0, "answers": {"harmful": []}}]}))
    r = runner.invoke(app, ["package", str(gguf), "-o", str(tmp_path), "--eval", str(report)])
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "tiny-Q8_0.bundle.tar"
    m = _members(bundle)
    stem = "tiny-Q8_0"
    assert set(m) == {f"{stem}/{n}" for n in ("tiny-Q8_0.gguf", "provenance.json", "README.md", "SHA256SUMS")}
    assert m[f"{stem}/tiny-Q8_0.gguf"] == gguf.read_bytes()  # unchanged, byte for byte
    for line in m[f"{stem}/SHA256SUMS"].decode().splitlines():  # what `sha256sum -c` checks on the device
        digest, name = line.split("  ")
        assert hashlib.sha256(m[f"{stem}/{name}"]).hexdigest() == digest, name
    prov = json.loads(m[f"{stem}/provenance.json"])
    assert prov["architecture"] == "llama" and prov["custom_types"] == []
    assert prov["metadata"]["qrealign.outtype"] == "Q8_0" and prov["metadata"]["qrealign.realign_iters"] == "7"
    assert prov["evaluation"]["variant"]["harmful"]["refusal"] == 0.5 and "answers" not in prov["evaluation"]["variant"]
    card = m[f"{stem}/README.md"].decode()
    assert "Q-realign" in card and "50.0 %" in card and "stock llama.cpp" in card
    # reproducible: packaging again gives the same bytes
    again = runner.invoke(app, ["package", str(gguf), "-o", str(tmp_path / "again.tar"), "--eval", str(report)])
    assert again.exit_code == 0 and (tmp_path / "again.tar").read_bytes() == bundle.read_bytes()


def test_custom_type_bundle_carries_patches(files, tmp_path) -> None:
    out = tmp_path / "ko.tar"
    r = runner.invoke(app, ["package", str(files["ko"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = _members(out)
    stem = "tiny-QR4_KO.qrealign"
    patches = sorted(p.name for p in (Path(__file__).parent.parent / "native" / "llama_patches").glob("*.patch"))
    assert patches and all(f"{stem}/llama_patches/{p}" in m for p in patches)
    assert "GGML_CPU_ARM_ARCH" in m[f"{stem}/BUILD.md"].decode()
    card = m[f"{stem}/README.md"].decode()
    assert "cannot load it" in card and "QR4_KO" in card and "without realignment" in card
    assert json.loads(m[f"{stem}/provenance.json"])["custom_types"] == ["QR4_KO"]


@pytest.mark.parametrize("case", ["missing", "not_gguf", "bad_suffix", "eval_other_file", "eval_malformed"])
def test_bad_input_one_line_no_bundle(files, tmp_path, case) -> None:
    gguf = files["q8"]
    args = ["package", str(gguf), "-o", str(tmp_path / "b.tar")]
    if case == "missing":
        args[1], want = str(tmp_path / "nope.gguf"), "does not exist"
    elif case == "not_gguf":
        (tmp_path / "x.gguf").write_text("hello")
        args[1], want = str(tmp_path / "x.gguf"), "not a readable GGUF"
    elif case == "bad_suffix":
        args[3], want = str(tmp_path / "b.zip"), ".tar file"
    elif case == "eval_other_file":
        (tmp_path / "r.json").write_text(json.dumps({"variants": [{"path": "/x/other.gguf"}]}))
        args += ["--eval", str(tmp_path / "r.json")]
        want = "no result for tiny-Q8_0.gguf"
    else:
        (tmp_path / "r.json").write_text("{not json")
        args += ["--eval", str(tmp_path / "r.json")]
        want = "not an `qrealign-gguf eval --json` report"
    r = runner.invoke(app, args)
    assert r.exit_code != 0 and "Traceback" not in r.output
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and want in msg, msg
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob("*.part"))
