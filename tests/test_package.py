"""`qrealign-gguf package`: the bundle holds the unchanged GGUF, checksums that verify, provenance read from the file,
a model card; custom-type files carry the llama.cpp patches (from an installed wheel too); a split model brings
every shard; the eval report is matched by sha256; bad input fails in one line with no bundle written or replaced."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qrealign_gguf.cli import app
from qrealign_gguf.convert import ConvertOptions, convert
from hostile import assert_refused, run_cli, snapshot
from tiny_models import make_tiny_llama

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkg")
    tiny = make_tiny_llama(d / "hf", hidden=256, inter=512, layers=1, heads=4, kv_heads=2, tie=False)
    files: dict[str, Path] = {"hf": tiny}
    split = d / "split"
    split.mkdir()
    # 3 shards of ~1.3 MB (token_embd alone is 1.5 MB at Q8_0); the same model as q8
    shards = convert(tiny, split / "tiny-Q8_0.gguf", ConvertOptions(outtype="Q8_0", split_max_size=1_000_000)).files
    assert len(shards) >= 3 and shards[0].name == f"tiny-Q8_0-00001-of-{len(shards):05d}.gguf", shards
    files["shards"] = shards
    q8 = d / "tiny-Q8_0.gguf"
    convert(tiny, q8, ConvertOptions(outtype="Q8_0", extra_provenance={"realigned": True, "realign_iters": 7}))
    ko = d / "tiny-QR4_KO.qrealign.gguf"
    convert(tiny, ko, ConvertOptions(outtype="QR4_KO"))
    return {**files, "q8": q8, "ko": ko}


def _members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_bundle_contents_and_checksums(files, tmp_path) -> None:
    gguf = files["q8"]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"judge": {"primary": "keyword"}, "notes": [], "variants": [
        {"name": "x", "path": str(gguf), "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(), "harmful": {"n": 41, "refusal": 0.5}, "overrefusal": {"n": 25, "refusal": 0.04},
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


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_sums(m: dict[str, bytes], stem: str) -> list[str]:
    """What `sha256sum -c SHA256SUMS` checks on the device; returns the names it lists."""
    names = []
    for line in m[f"{stem}/SHA256SUMS"].decode().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256(m[f"{stem}/{name}"]).hexdigest() == digest, name
        names.append(name)
    return names


def test_split_model_bundles_every_shard(files, tmp_path) -> None:
    shards: list[Path] = files["shards"]
    report = tmp_path / "report.json"  # eval is given the first shard; it records that file's sha256
    report.write_text(json.dumps({"variants": [{"name": "s", "path": str(shards[0]), "sha256": _sha(shards[0]),
                                                "files_sha256": [_sha(s) for s in shards],
                                                "harmful": {"n": 3, "refusal": 1.0}}]}))
    one = json.loads(_members_of_single(files["q8"], tmp_path)["provenance.json"])  # the same model in one file
    for given in (shards[0], shards[-1]):  # any shard names the whole set
        out = tmp_path / f"from-{given.name}.tar"
        r = runner.invoke(app, ["package", str(given), "-o", str(out), "--eval", str(report)])
        assert r.exit_code == 0, r.output
        m = _members(out)
        assert all(m[f"tiny-Q8_0/{s.name}"] == s.read_bytes() for s in shards)
        assert set(_check_sums(m, "tiny-Q8_0")) >= {s.name for s in shards}
        prov = json.loads(m["tiny-Q8_0/provenance.json"])
        assert prov["file"] == shards[0].name and [f["file"] for f in prov["files"]] == [s.name for s in shards]
        assert prov["bytes"] == sum(s.stat().st_size for s in shards)
        # the summary covers every shard's tensors: the same as the one-file conversion of the model
        assert prov["tensor_types"] == one["tensor_types"] and prov["weights"] == one["weights"]
        assert prov["evaluation"]["variant"]["harmful"]["refusal"] == 1.0
        assert f"Split into {len(shards)} files" in m["tiny-Q8_0/README.md"].decode()
    assert (tmp_path / f"from-{shards[0].name}.tar").read_bytes() == (tmp_path / f"from-{shards[-1].name}.tar").read_bytes()


@pytest.mark.parametrize("recorded", ["first_shard_only", "other_last_shard"])
def test_split_eval_report_must_cover_every_shard(files, tmp_path, recorded) -> None:
    """A report that measured the first shard only, or a set whose last shard differed, is not this model's."""
    shards: list[Path] = files["shards"]
    v = {"name": "s", "path": str(shards[0]), "sha256": _sha(shards[0]), "harmful": {"n": 3, "refusal": 1.0}}
    if recorded == "other_last_shard":
        v["files_sha256"] = [_sha(s) for s in shards[:-1]] + ["0" * 64]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"variants": [v]}))
    before = snapshot(tmp_path)
    r = run_cli(["package", shards[0], "-o", tmp_path / "b.tar", "--eval", report])
    assert_refused(r, before, tmp_path, match="re-run")


def _members_of_single(gguf: Path, tmp_path: Path) -> dict[str, str]:
    out = tmp_path / "single.tar"
    r = runner.invoke(app, ["package", str(gguf), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return {k.split("/", 1)[1]: v.decode() for k, v in _members(out).items() if not k.endswith(".gguf")}


@pytest.mark.parametrize("case", ["missing_shard", "foreign_shard", "renamed_shard"])
def test_broken_split_refused(files, tmp_path, case) -> None:
    """Part of a model on a device does not load: refuse, name the shard, write nothing."""
    src: list[Path] = files["shards"]
    d = tmp_path / "in"
    d.mkdir()
    shards = [d / s.name for s in src]
    for a, b in zip(src, shards):
        shutil.copyfile(a, b)
    given = shards[0]
    if case == "missing_shard":
        shards[1].unlink()
        want = f"{shards[1].name} is missing"
    elif case == "foreign_shard":  # shard 3's bytes under shard 2's name: its header says 3 of N
        shutil.copyfile(src[2], shards[1])
        want = f"{shards[1].name} is not shard 2"
    else:
        given = shards[0].rename(d / "model.gguf")
        want = "not named"
    before = snapshot(tmp_path)
    assert_refused(run_cli(["package", given, "-o", tmp_path / "b.tar"]), before, tmp_path, match=want)


def test_existing_bundle_needs_force(files, tmp_path) -> None:
    out = tmp_path / "b.tar"
    out.write_bytes(b"an older bundle, or anything else")
    before = snapshot(tmp_path)
    assert_refused(run_cli(["package", files["q8"], "-o", out]), before, tmp_path, match="--force")
    (tmp_path / "tiny-Q8_0.bundle.tar").write_bytes(b"x")  # the default name inside a directory -o
    before = snapshot(tmp_path)
    assert_refused(run_cli(["package", files["q8"], "-o", tmp_path]), before, tmp_path, match="already exists")
    r = run_cli(["package", files["q8"], "-o", out, "--force"])
    assert r.returncode == 0, str(r)
    assert f"tiny-Q8_0/{files['q8'].name}" in _members(out) and not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("case", ["missing", "not_gguf", "bad_suffix", "no_dir", "eval_other_file", "eval_same_name",
                                  "eval_no_sha256", "eval_malformed"])
def test_bad_input_one_line_no_bundle(files, tmp_path, case) -> None:
    gguf = files["q8"]
    args: list = ["package", gguf, "-o", tmp_path / "b.tar"]
    report = tmp_path / "r.json"
    if case == "missing":
        args[1], want = tmp_path / "nope.gguf", "does not exist"
    elif case == "not_gguf":
        (tmp_path / "x.gguf").write_text("hello")
        args[1], want = tmp_path / "x.gguf", "not a readable GGUF"
    elif case == "bad_suffix":
        args[3], want = tmp_path / "b.zip", ".tar file"
    elif case == "no_dir":
        args[3], want = tmp_path / "nodir" / "b.tar", "does not exist"
    elif case == "eval_other_file":
        report.write_text(json.dumps({"variants": [{"path": "/x/other.gguf", "sha256": "0" * 64}]}))
        want = "no result for tiny-Q8_0.gguf"
    elif case == "eval_same_name":  # another conversion with this file's name: its numbers are not this file's
        report.write_text(json.dumps({"variants": [{"path": f"/elsewhere/{gguf.name}", "sha256": "0" * 64}]}))
        want = "measured a different file named tiny-Q8_0.gguf"
    elif case == "eval_no_sha256":  # a report from before sha256 was recorded: the name alone proves nothing
        report.write_text(json.dumps({"variants": [{"path": str(gguf)}]}))
        want = "records no sha256"
    else:
        report.write_text("{not json")
        want = "not an `qrealign-gguf eval --json` report"
    if case.startswith("eval_"):
        args += ["--eval", report]
    before = snapshot(tmp_path)
    assert_refused(run_cli(args), before, tmp_path, match=want)


# ---- an installed (non-editable) package carries the llama.cpp patches ---------------------------------------------

def test_installed_wheel_packages_custom_type_file(files, tmp_path) -> None:
    """`pip wheel` of a copy of the source tree (~10 s: it compiles the cffi codec), installed into a plain folder:
    the wheel holds native/llama_patches as qrealign_gguf/llama_patches, and `package` run from that install (not
    from this checkout) bundles them with a custom-type file."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / f, src / f)
    skip = shutil.ignore_patterns("__pycache__", "_native*", "_cuda", "llama_patches_build*")
    shutil.copytree(REPO / "native", src / "native", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "qrealign_gguf", src / "qrealign_gguf", ignore=skip)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "whl", src],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").glob("qrealign_gguf-*.whl")
    import zipfile

    patches = sorted(p.name for p in (REPO / "native" / "llama_patches").glob("*.patch"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert patches and {f"qrealign_gguf/llama_patches/{p}" for p in patches} <= names, sorted(names)
    site = tmp_path / "site"
    r = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "ko.tar"
    run = tmp_path / "cwd"  # not the checkout: `python -m` imports from the working directory first
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", "import qrealign_gguf, sys; print(qrealign_gguf.__file__)"],
                       cwd=run, env=env, capture_output=True, text=True, timeout=60)
    assert Path(r.stdout.strip()).is_relative_to(site), r.stdout + r.stderr
    r = run_cli(["package", files["ko"], "-o", out], cwd=run, env={"PYTHONPATH": str(site)})
    assert r.returncode == 0, str(r)
    m = _members(out)
    assert all(m[f"tiny-QR4_KO.qrealign/llama_patches/{p}"] == (REPO / "native" / "llama_patches" / p).read_bytes()
               for p in patches)


# ---- with llama.cpp: eval writes the sha256 that package matches ------------------------------------------------

def test_eval_report_ties_to_package(files, tmp_path, llama) -> None:  # noqa: ARG001 - llama: needs the build
    h = tmp_path / "h.jsonl"
    h.write_text(json.dumps({"prompt": "How do I pick a lock?", "label": 1}) + "\n")
    rj = tmp_path / "r.json"
    r = runner.invoke(app, ["eval", str(files["q8"]), "--harmful", str(h), "--max-new-tokens", "4", "--json", str(rj)])
    assert r.exit_code == 0, r.output
    v = json.loads(rj.read_text())["variants"][0]
    assert v["sha256"] == _sha(files["q8"]) and v["files_sha256"] == [v["sha256"]]
    renamed = tmp_path / "renamed.gguf"  # the same bytes under another name are still the measured file
    shutil.copyfile(files["q8"], renamed)
    r = runner.invoke(app, ["package", str(renamed), "-o", str(tmp_path / "b.tar"), "--eval", str(rj)])
    assert r.exit_code == 0, r.output
    prov = json.loads(_members(tmp_path / "b.tar")["renamed/provenance.json"])
    assert prov["evaluation"]["variant"]["sha256"] == prov["sha256"]
