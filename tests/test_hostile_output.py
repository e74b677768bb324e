"""Hostile outputs and arguments (issue 19): an output is never replaced without --force, bad numbers are refused
before anything is loaded, OS errors come out as one line naming the path, and an interrupted or killed run leaves
nothing that a later run mistakes for, or keeps beside, a finished file.

Everything runs the real CLI in a child (tests/hostile.py). The OS errors are produced for real: a file where a
directory is expected, /proc, over-long names, `ulimit -f` (EFBIG, and a short write), a child without
CAP_DAC_OVERRIDE (EACCES, though we run as root), a small tmpfs (ENOSPC) and a read-only bind mount (EROFS); the
last ones are skipped, with the reason, where the machine does not allow them.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest

from hostile import MEM_LIMIT_MB, TIME_LIMIT_S, Run, assert_refused, run_cli, snapshot
from qrealign_gguf.output import WRITER_LOCK
from qrealign_gguf.plan import make_plan
from tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes a clean Q8_0 conversion gives (conversion is deterministic)."""
    d = tmp_path_factory.mktemp("ref")
    r = run_cli(["convert", tiny, "-o", d / "m.gguf"])
    assert r.returncode == 0, str(r)
    return (d / "m.gguf").read_bytes()


def _model(tiny: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny, d)
    return d


def _run_wrapped(shell_prefix: str, args: list[str | Path], cwd: Path | None = None) -> Run:
    """run_cli with extra shell commands before the exec (`ulimit -f`, `exec setpriv ...`): the OS conditions
    some tests need, which run_cli has no parameter for. Same memory cap and time limit."""
    argv = [str(a) for a in args]
    cmd = f"ulimit -v {MEM_LIMIT_MB * 1024}; {shell_prefix} \"$0\" -m qrealign_gguf \"$@\""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("QREALIGN_DEBUG", None)
    p = subprocess.run(["bash", "-c", cmd, sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=TIME_LIMIT_S, input="")
    return Run(argv, p.returncode, p.stdout, p.stderr)


def _shards(d: Path, stem: str = "m") -> list[str]:
    return sorted(p.name for p in d.glob(f"{stem}-*-of-*.gguf"))


def _partials(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(".partial"))


# -- 1. split outputs: shards are outputs too -------------------------------------------------------------------
def test_split_shards_need_force_and_replace_whole_sets(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli(["convert", tiny, "-o", out / "m.gguf", "--split-max-size", "2M"])
    assert r.returncode == 0, str(r)
    assert _shards(out) == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]

    before = snapshot(out)
    # the same split again, and a single file for the same target: both would leave or replace this run's shards
    assert_refused(run_cli(["convert", tiny, "-o", out / "m.gguf", "--split-max-size", "2M"]), before, out,
                   match="m-00001-of-00002.gguf already exists")
    assert_refused(run_cli(["convert", tiny, "-o", out / "m.gguf"]), before, out, match="--force")

    # --force with another shard count: the new set replaces the old one entirely (no stale 2-shard set beside it)
    r = run_cli(["convert", tiny, "-o", out / "m.gguf", "--split-max-size", "1", "--force"])
    assert r.returncode == 0, str(r)
    names = _shards(out)
    n = len(names)
    assert n > 2 and names == [f"m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert "removed" in r.stderr and "m-00001-of-00002.gguf" in r.stderr
    for i, name in enumerate(names):
        fields = gguf.GGUFReader(out / name).fields
        assert fields["split.count"].contents() == n and fields["split.no"].contents() == i

    # --force back to one file: every shard goes, the file is what a clean conversion writes
    r = run_cli(["convert", tiny, "-o", out / "m.gguf", "--force"])
    assert r.returncode == 0, str(r)
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf"]


def test_dangling_symlink_output_needs_force(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "m.gguf").symlink_to(tmp_path / "nowhere.gguf")
    before = snapshot(tmp_path)
    assert_refused(run_cli(["convert", tiny, "-o", tmp_path / "m.gguf"]), before, tmp_path, match="--force")


# -- 2. numbers: refused before anything is loaded ---------------------------------------------------------------
# the model path does not exist: the number's message (not "no such model") proves the check comes first
BAD_NUMBERS = [
    (["--split-max-size", "-1G"], "--split-max-size"),
    (["--split-max-size", "0.0001K"], "less than one byte"),
    (["--split-max-size", "infG"], "--split-max-size"),
    (["--split-max-size", "nan"], "--split-max-size"),
    (["--split-max-size", "2X"], "not a size"),
    (["--threads", "-1"], "--threads"),
    (["--calib-samples", "0"], "--calib-samples"),
    (["--realign-samples", "0"], "--realign-samples"),
    (["--realign-iters", "-1"], "--realign-iters"),
    (["--realign-lr", "0"], "--realign-lr"),
    (["--realign-lr", "nan"], "--realign-lr"),
    (["--realign-lr", "inf"], "--realign-lr"),
    (["--harm-weight", "-0.5"], "--harm-weight"),
    (["--harm-weight", "nan"], "--harm-weight"),
    (["--margin", "nan"], "--margin"),
    (["--margin", "-inf"], "--margin"),
    (["--margin-offset", "inf"], "--margin-offset"),
    (["--benign-ceiling", "nan"], "--benign-ceiling"),
    (["--benign-last-weight", "-1"], "--benign-last-weight"),
]


@pytest.mark.parametrize("extra,match", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_convert_bad_numbers(tmp_path: Path, extra: list[str], match: str) -> None:
    before = snapshot(tmp_path)
    assert_refused(run_cli(["convert", tmp_path / "no-such-model", "-o", tmp_path / "m.gguf", *extra]), before,
                   tmp_path, match=match)


PROBE_EVAL_NUMBERS = [
    (["probe", "MODEL", "-o", "OUT/p.safetensors", "--samples", "0"], "--samples"),
    (["probe", "MODEL", "-o", "OUT/p.safetensors", "--min-acc", "1.5"], "--min-acc"),
    (["probe", "MODEL", "-o", "OUT/p.safetensors", "--min-acc", "-0.1"], "--min-acc"),
    (["probe", "MODEL", "-o", "OUT/p.safetensors", "--min-acc", "nan"], "--min-acc"),
    (["eval", "MODEL", "--harmful", "builtin:harmful", "--threads", "-1"], "--threads"),
    (["eval", "MODEL", "--harmful", "builtin:harmful", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "MODEL", "--harmful", "builtin:harmful", "--limit", "0"], "--limit"),
    (["eval", "MODEL", "--harmful", "builtin:harmful", "--n-parallel", "0"], "--n-parallel"),
]


@pytest.mark.parametrize("args,match", PROBE_EVAL_NUMBERS, ids=[" ".join(a) for a, _ in PROBE_EVAL_NUMBERS])
def test_probe_and_eval_bad_numbers(tmp_path: Path, args: list[str], match: str) -> None:
    args = [a.replace("MODEL", str(tmp_path / "no-such-model")).replace("OUT", str(tmp_path)) for a in args]
    before = snapshot(tmp_path)
    assert_refused(run_cli(args), before, tmp_path, match=match)


# -- 3. OS errors: one line with the path and the cause, nothing left behind -------------------------------------
def test_output_directory_is_a_file(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    assert_refused(run_cli(["convert", tiny, "-o", tmp_path / "afile" / "m.gguf"]), before, tmp_path,
                   match="not a directory")


def test_output_under_proc(tiny: Path) -> None:
    r = run_cli(["convert", tiny, "-o", "/proc/m.gguf"])
    line = assert_refused(r, {}, match="/proc")
    assert "internal error" not in line
    assert not Path("/proc/m.gguf").exists()


def test_too_long_names(tiny: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    assert_refused(run_cli(["convert", tiny, "-o", tmp_path / ("a" * 300 + ".gguf")]), before, tmp_path,
                   match="File name too long")
    # legal as one file, too long once gguf-py appends -00001-of-00002: refused before writing
    long_ok = tmp_path / ("b" * 245 + ".gguf")
    assert_refused(run_cli(["convert", tiny, "-o", long_ok, "--split-max-size", "2M"]), before, tmp_path,
                   match="longer than this file system allows")
    # and the hidden temporary directory never makes a legal name fail
    r = run_cli(["convert", tiny, "-o", long_ok])
    assert r.returncode == 0, str(r)
    assert [p.name for p in tmp_path.iterdir()] == [long_ok.name]


def test_file_size_limit_efbig(tiny: Path, tmp_path: Path) -> None:
    """`ulimit -f` (Python ignores SIGXFSZ): the kernel refuses the write, for real."""
    before = snapshot(tmp_path)
    for kib in (1000, 4000):  # one limit hits a plain write (EFBIG), the other numpy's tofile (a short write)
        line = assert_refused(_run_wrapped(f"ulimit -f {kib}; exec", ["convert", tiny, "-o", tmp_path / "m.gguf"]),
                              before, tmp_path)
        assert str(tmp_path / "m.gguf") in line and ("EFBIG" in line or "stopped short" in line), line


def test_permission_denied_without_dac_override(tiny: Path, tmp_path: Path) -> None:
    """Root ignores permission bits; a child without CAP_DAC_OVERRIDE does not, so EACCES is real."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    model = _model(tiny, tmp_path)  # owned by us, so readable without the capability
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        before = snapshot(tmp_path)
        prefix = "exec setpriv --bounding-set=-dac_override,-dac_read_search" if os.geteuid() == 0 else "exec"
        r = _run_wrapped(prefix, ["convert", model, "-o", ro / "m.gguf"])
        if r.returncode != 2 and "Operation not permitted" in r.stderr:
            pytest.skip(f"setpriv cannot drop capabilities here: {r.stderr.strip()}")
        line = assert_refused(r, before, tmp_path, match="Permission denied")
        assert str(ro) in line
    finally:
        ro.chmod(0o700)


def _mount(args: list[str], where: Path) -> None:
    r = subprocess.run(["mount", *args, str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(args)}): {r.stderr.strip()}")


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points to unmount at the end."""
    points: list[Path] = []
    yield points
    for p in reversed(points):
        subprocess.run(["umount", str(p)], capture_output=True)


def test_disk_full_enospc(tiny: Path, tmp_path: Path, mounted: list[Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    need = make_plan(tiny, tmp_path).total_bytes
    small, fits = tmp_path / "small", tmp_path / "fits"
    for d, size in ((small, 256 * 1024), (fits, need + 256 * 1024)):
        d.mkdir()
        _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs"], d)
        mounted.append(d)
    # far too small: refused before any work, from the free space
    before = snapshot(small)
    assert_refused(run_cli(["convert", tiny, "-o", small / "m.gguf"]), before, small, match="MB free")
    # room for the tensor data but not for the whole file: the write itself fails; no half file, no temp dir
    before = snapshot(fits)
    line = assert_refused(run_cli(["convert", tiny, "-o", fits / "m.gguf"]), before, fits)
    assert str(fits / "m.gguf") in line and ("ENOSPC" in line or "stopped short" in line), line


def test_read_only_mount_erofs(tiny: Path, tmp_path: Path, mounted: list[Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    _mount(["--bind", "-o", "ro", str(ro)], ro)
    mounted.append(ro)
    before = snapshot(tmp_path)
    line = assert_refused(run_cli(["convert", tiny, "-o", ro / "m.gguf"]), before, tmp_path, match="EROFS")
    assert str(ro) in line


# -- 4/5. killed, interrupted and concurrent runs -----------------------------------------------------------------
def _start_convert(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.Popen([sys.executable, "-m", "qrealign_gguf", "convert", str(model), "-o", str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_writer(p: subprocess.Popen, d: Path, timeout: float = TIME_LIMIT_S) -> Path:
    """The partial dir of a run that holds its writer lock and has opened its output file inside."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for part in d.glob(".m.*.partial"):
            if (part / WRITER_LOCK).exists() and (part / "m.gguf").exists():
                return part
        if p.poll() is not None:
            pytest.fail(f"the convert ended (exit {p.returncode}) before it was caught writing: {p.stderr.read()}")
        time.sleep(0.005)
    p.kill()
    pytest.fail("the convert never started writing")


def test_killed_run_is_cleaned_by_the_next(tiny: Path, tmp_path: Path, reference: bytes) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # partial-looking things that are not a dead run's of this target: never touched
    foreign = out / ".m.foreign.partial"  # no lock file: not ours
    foreign.mkdir()
    (foreign / "keep").write_text("x")
    other = out / ".other.abc123.partial"  # ours, dead, but another target's
    other.mkdir()
    (other / WRITER_LOCK).write_text("pid 1\n")
    (out / ".m.file.partial").write_text("a file, not a directory")

    p = _start_convert(tiny, out / "m.gguf", "--threads", "1")
    stale = _wait_for_writer(p, out)
    p.kill()
    p.communicate()
    assert stale.is_dir() and not (out / "m.gguf").exists()  # SIGKILL leaves it: nothing can run on a kill

    r = run_cli(["convert", tiny, "-o", out / "m.gguf"])
    assert r.returncode == 0, str(r)
    assert not stale.exists() and str(stale) in r.stderr  # removed, and said so
    assert (out / "m.gguf").read_bytes() == reference
    assert foreign.is_dir() and (foreign / "keep").exists() and other.is_dir() and (out / ".m.file.partial").is_file()


def test_live_run_is_left_alone_and_not_overwritten(tiny: Path, tmp_path: Path, reference: bytes) -> None:
    """Run A is stopped mid-write; run B on the same target must not touch A's partial dir; when A resumes, B's
    finished file exists, and A, without --force, must not replace it."""
    out = tmp_path / "out"
    out.mkdir()
    a = _start_convert(tiny, out / "m.gguf", "--threads", "1", "--outtype", "Q4_0")
    a_dir = _wait_for_writer(a, out)
    os.kill(a.pid, signal.SIGSTOP)
    try:
        r = run_cli(["convert", tiny, "-o", out / "m.gguf"])
        assert r.returncode == 0, str(r)
        assert a_dir.is_dir() and (a_dir / WRITER_LOCK).exists()  # a live writer's dir: untouched
    finally:
        os.kill(a.pid, signal.SIGCONT)
    stdout, stderr = a.communicate(timeout=TIME_LIMIT_S)
    assert a.returncode == 2, stderr
    assert "appeared while converting" in stderr and "Traceback" not in stderr, stderr
    assert (out / "m.gguf").read_bytes() == reference  # B's Q8_0 file, not A's Q4_0
    assert _partials(out) == []


def test_sigterm_cleans_up(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    p = _start_convert(tiny, out / "m.gguf", "--threads", "1")
    _wait_for_writer(p, out)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=TIME_LIMIT_S)
    assert p.returncode == 130, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "interrupted" in lines[0], stderr
    assert list(out.iterdir()) == []


# -- other outputs: --save-imatrix, probe -o/--plot, eval --json/--plot -------------------------------------------
def test_save_imatrix_needs_force(tiny: Path, tmp_path: Path) -> None:
    im = tmp_path / "im.gguf"
    im.write_bytes(b"keep me")
    base = ["convert", tiny, "-o", tmp_path / "m.gguf", "--calib", "builtin:benign", "--calib-samples", "2"]
    before = snapshot(tmp_path)
    assert_refused(run_cli([*base, "--save-imatrix", im]), before, tmp_path, match="--force")
    assert_refused(run_cli(["convert", tiny, "-o", tmp_path / "m.gguf", "--save-imatrix", tmp_path / "new.gguf"]),
                   before, tmp_path, match="--calib")
    assert_refused(run_cli([*base, "--save-imatrix", tmp_path / "m.gguf"]), before, tmp_path, match="main output")
    r = run_cli([*base, "--save-imatrix", im, "--force"])
    assert r.returncode == 0, str(r)
    reader = gguf.GGUFReader(im)  # replaced by a whole imatrix GGUF, no temporary left
    assert any(t.name.endswith(".in_sum2") for t in reader.tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.gguf", "m.gguf"]


def test_probe_and_eval_outputs_need_force(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"  # the outputs are checked before the model is looked at
    for name in ("p.safetensors", "p.png", "r.json", "r.png"):
        (tmp_path / name).write_text("keep me")
    before = snapshot(tmp_path)
    cases = [
        (["probe", missing, "-o", tmp_path / "p.safetensors"], "-o"),
        (["probe", missing, "-o", tmp_path / "new.safetensors", "--plot", tmp_path / "p.png"], "--plot"),
        (["eval", missing, "--harmful", "builtin:harmful", "--json", tmp_path / "r.json"], "--json"),
        (["eval", missing, "--harmful", "builtin:harmful", "--plot", tmp_path / "r.png"], "--plot"),
    ]
    for args, option in cases:
        line = assert_refused(run_cli(args), before, tmp_path, match="already exists; pass --force")
        assert option in line
    # with --force the output check passes and the next problem (the missing model) is reported instead
    r = run_cli(["eval", missing, "--harmful", "builtin:harmful", "--json", tmp_path / "r.json", "--force"])
    assert_refused(r, before, tmp_path, match="does not exist")


# -- 6. the help says what --margin really does -------------------------------------------------------------------
def test_margin_help_names_the_offset() -> None:
    r = run_cli(["convert", "--help"])
    assert r.returncode == 0, str(r)
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", r.stdout).split())  # rich's help box, unwrapped
    for phrase in ("--margin plus --margin-offset", "1.5 unless given", "--margin-offset 0 for exactly"):
        assert phrase in text, text
