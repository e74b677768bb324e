"""QR5_K128 on 64-bit ARM, run under qemu-aarch64 (issue 21): the NEON kernel of native/llama_patches/0007 (sdot
with -march=armv8.2-a+dotprod), our codec's bytes there, and the patched llama.cpp running QR files there.

The kernel is checked as on x86 (tests/test_qr5k128_llama.py): against the exact dot of the decoded operands within
the float32 rounding bound, a bound five plausible wrong kernels fail, and three NEON kernels broken on purpose
fail too. ggml's test-backend-ops runs as well: on its own, with the CPU as the only backend, its test mode would
compare the kernel with itself; patch 0007 makes the reference side take the generic C dot.

`make test` runs the quick codec check (our C codec alone, cross-compiled; ~1 min) and, when the static aarch64
build is cached, the rest but the real model; `make edge-check` builds it and runs everything (QREALIGN_EDGE_FULL=1),
including Qwen2.5-Coder-0.5B as QR4_K_M answering a prompt under qemu, bundled for linux-aarch64.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qrealign_gguf.convert import ConvertOptions, convert
from qrealign_gguf.formats import codec
from qrealign_gguf.formats.types import qtype

from conftest import adversarial_rows
from edge import FULL, FULL_REASON, QEMU, CROSS_CC, cross_link, qemu, require_cross_tools, static_build
from test_qr5k128_llama import _dot_error, _dot_terms, _wrong_kernels
from tiny_models import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CHECK_SRC = ROOT / "tests" / "native" / "edge_qr5k128_check.c"
CODEC_SRC = sorted((ROOT / "native").glob("*.c"))
T = qtype("QR5_K128")
N = 896  # 7 x 128: Qwen2.5-0.5B's width, where QR5_K128 stands in for Q5_0
N_RANDOM = 6  # the last rows of _inputs: heavy-tailed weights, activations from 1e-2 to 1e3
# ggml-cpu's C flags in the static build (its CMakeFiles/ggml-cpu.dir/flags.make), for recompiling one kernel file
GGML_CPU_CFLAGS = ["-O3", "-DNDEBUG", "-std=gnu11", "-DGGML_SCHED_MAX_COPIES=4", "-DGGML_USE_CPU_REPACK",
                   "-DGGML_USE_LLAMAFILE", "-D_GNU_SOURCE", "-D_XOPEN_SOURCE=600"]


# ---- quick (make test): our codec alone, cross-compiled and run under qemu; no llama.cpp build needed -------------

CODEC_CHECK_SRC = ROOT / "tests" / "native" / "edge_codec_check.c"
CODEC_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "QR4_KO",
               "QR5_K128")
CODEC_N = 512  # a multiple of every block size (32, 128, 256)


@pytest.fixture(scope="module")
def codec_checker(tmp_path_factory) -> Path:
    require_cross_tools()
    out = tmp_path_factory.mktemp("edge_codec") / "edge_codec_check"
    # the codec's own flags (native/build_ffi.py): no fused multiply-add, so its floats match the x86 build's
    cmd = [CROSS_CC, "-O3", "-std=gnu11", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-static",
           f"-I{ROOT / 'native'}", str(CODEC_CHECK_SRC), *map(str, CODEC_SRC), "-o", str(out), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", CODEC_TYPES)
def test_codec_bytes_on_aarch64_quick(codec_checker, name) -> None:
    """Our C codec compiled for aarch64 writes, under qemu-aarch64, the bytes it writes on this machine (ggml's hard
    rows and heavy-tailed ones, with and without an imatrix) and decodes them to bit-identical floats: a file
    converted on an ARM host (a Mac, a Pi) is the same file."""
    t = qtype(name)
    rng = np.random.default_rng(7)
    heavy = (rng.standard_t(3, (4, CODEC_N)) * 0.05).astype(np.float32)
    x = np.ascontiguousarray(np.vstack([adversarial_rows(CODEC_N, rng), heavy]), dtype=np.float32)
    im = rng.uniform(0.1, 5, CODEC_N).astype(np.float32)
    r = qemu([codec_checker, t.id, len(x), CODEC_N], timeout=600, input=x.tobytes() + im.tobytes())
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    want, want_i = codec.quantize(x, t), codec.quantize(x, t, imatrix=im)
    assert len(r.stdout) == 2 * want.nbytes + 4 * x.size
    got = np.frombuffer(r.stdout, np.uint8)
    np.testing.assert_array_equal(got[:want.nbytes], want.ravel())
    np.testing.assert_array_equal(got[want.nbytes:2 * want.nbytes], want_i.ravel())
    deq = got[2 * want.nbytes:].view(np.uint32)
    np.testing.assert_array_equal(deq, codec.dequantize(want, t, CODEC_N).view(np.uint32).ravel())


# ---- the static patched llama.cpp for linux-aarch64 (edge-check; make test when its build is cached) --------------

@pytest.fixture(scope="module")
def cross() -> Path:
    return static_build("patched", "linux-aarch64")


@pytest.fixture(scope="module")
def checker(cross, tmp_path_factory) -> Path:
    return cross_link(tmp_path_factory.mktemp("edge") / "edge_qr5k128_check", cross, [CHECK_SRC, *CODEC_SRC])


def _inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (ggml's hard cases, then heavy-tailed rows), an imatrix, one activation row per weight row."""
    rng = np.random.default_rng(21)
    heavy = (rng.standard_t(3, (N_RANDOM, N)) * 0.05).astype(np.float32)
    x = np.ascontiguousarray(np.vstack([adversarial_rows(N, rng), heavy]), dtype=np.float32)
    im = rng.uniform(0.1, 5, N).astype(np.float32)
    scale = 10.0 ** (np.arange(len(x)) % 6 - 2)[:, None]
    act = (rng.standard_normal(x.shape) * scale).astype(np.float32)
    return x, im, act


def _run_checker(exe: Path, x: np.ndarray, im: np.ndarray, act: np.ndarray) -> dict[str, np.ndarray]:
    """What the device computes (edge_qr5k128_check.c's output, split by its layout)."""
    r = qemu([exe, len(x), N], timeout=600, input=x.tobytes() + im.tobytes() + act.tobytes())
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    rows, rb, yb = len(x), N // 128 * 90, N // 32 * 36
    sizes = {"q": rows * rb, "qi": rows * rb, "cq": rows * rb, "cqi": rows * rb, "deq": 4 * x.size, "cdeq": 4 * x.size,
             "yq": rows * yb, "dot": 4 * rows, "dotg": 4 * rows}
    assert len(r.stdout) == sum(sizes.values())
    out, at = {}, 0
    for k, n in sizes.items():
        out[k], at = np.frombuffer(r.stdout[at:at + n], np.uint8), at + n
    out.update({k: out[k].view(np.float32) for k in ("deq", "cdeq", "dot", "dotg")})
    out.update({k: out[k].reshape(rows, -1) for k in ("q", "qi", "cq", "cqi", "yq")})
    return out


def _dot_errors(got: np.ndarray, q: np.ndarray, yq: np.ndarray) -> list[float]:
    """Per row, |got - exact| in units of the float32 rounding bound (test_qr5k128_llama._dot_error); a row whose
    bound is 0 (all-zero codes or activations) must give the exact value, 0 or inf."""
    errs = []
    for r in range(len(got)):
        a, a_abs, b = _dot_terms(q[r:r + 1], yq[r], N)
        if a_abs.sum() + np.abs(b).sum() == 0:
            errs.append(0.0 if float(got[r]) == float(a.sum() - b.sum()) else np.inf)
        else:
            errs.append(_dot_error(float(got[r]), a, a_abs, b))
    return errs


@pytest.fixture(scope="module")
def device_results(checker) -> dict[str, np.ndarray]:
    return _run_checker(checker, *_inputs())


def test_neon_dotprod_kernel_is_compiled(cross, checker) -> None:
    """The static linux-aarch64 build targets ARMv8.2-A + dotprod, and the QR5_K128 kernel it links is the NEON one
    of patch 0007 (sdot instructions), not an alias of the generic C kernel."""
    info = (cross / "BUILDINFO").read_text()
    assert "arm_arch=armv8.2-a+dotprod" in info and "aarch64-linux-gnu-g++" in info, info
    syms = subprocess.run(["aarch64-linux-gnu-nm", str(checker)], capture_output=True, text=True, check=True).stdout
    addr = {s: a for a, _, s in (ln.split() for ln in syms.splitlines() if len(ln.split()) == 3)}
    kernel, generic = "ggml_vec_dot_qr5_k128_q8_1", "ggml_vec_dot_qr5_k128_q8_1_generic"
    assert kernel in addr and generic in addr and addr[kernel] != addr[generic]
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", f"--disassemble={kernel}", str(checker)],
                         capture_output=True, text=True, check=True).stdout
    assert len(re.findall(r"\bsdot\b", dis)) >= 8, dis[-3000:]  # 4 sub-blocks x 2 halves per block


def test_codec_bytes_on_aarch64(device_results) -> None:
    """On aarch64, next to ggml's library, our C codec writes the bytes it writes on this machine (with and without
    an imatrix), and ggml's decoder (patch 0005's to_float) and ours give bit-identical floats from the same bytes:
    a file converted on an ARM host is the same file, and the device reads it as x86 does."""
    x, im, _ = _inputs()
    d = device_results
    want, want_i = codec.quantize(x, T), codec.quantize(x, T, imatrix=im)
    np.testing.assert_array_equal(d["cq"], want)  # our codec, compiled for aarch64
    np.testing.assert_array_equal(d["cqi"], want_i)
    ref = codec.dequantize(d["q"], T, N).view(np.uint32).ravel()  # x86's decode of ggml's aarch64 bytes
    np.testing.assert_array_equal(d["cdeq"].view(np.uint32), ref)
    np.testing.assert_array_equal(d["deq"].view(np.uint32), ref)


def test_neon_kernel_matches_exact_dot(device_results) -> None:
    """ggml_vec_dot_qr5_k128_q8_1 (NEON, sdot) and its generic twin, run on aarch64 with aarch64's own Q8_1
    activation blocks, within the float32 bound of the exact dot on every row; the wrong kernels of
    test_qr5k128_llama fail that bound on the same operands."""
    d = device_results
    for name in ("dot", "dotg"):
        errs = _dot_errors(d[name], d["q"], d["yq"])
        assert max(errs) <= 1, (name, errs)
    for r in range(len(d["q"]) - N_RANDOM, len(d["q"])):
        a, a_abs, b = _dot_terms(d["q"][r:r + 1], d["yq"][r], N)
        for bug, v in _wrong_kernels(d["q"][r:r + 1], d["yq"][r], N).items():
            assert _dot_error(v, a, a_abs, b) > 1, (r, bug)


# ---- the kernel's other builds: without dotprod, and broken on purpose ------------------------------------------

# (name, -march, source edit): each variant recompiles arch/arm/quants.c from the patched source and links it in
# front of the build's libggml-cpu.a, replacing the kernel file's object only
BROKEN = {
    "high bit of weights 0-15 dropped": ("vshlq_n_u8(vandq_u8(qh, vdupq_n_u8(1)), 4)", "vdupq_n_u8(0)"),
    "min terms of all but the last block lost": ("accm = vmlaq_n_f32(accm,", "accm = vmlaq_n_f32(vdupq_n_f32(0.0f),"),
    "sub-block scales in the wrong lanes": ("vpaddq_s32(vpaddq_s32(part[0], part[1]), vpaddq_s32(part[2], part[3]))",
                                            "vpaddq_s32(vpaddq_s32(part[1], part[0]), vpaddq_s32(part[2], part[3]))"),
}


@pytest.fixture(scope="module")
def arm_quants(tmp_path_factory) -> Path:
    """arch/arm/quants.c of the pinned llama.cpp with native/llama_patches applied (ggml's includes beside it)."""
    src = tmp_path_factory.mktemp("llama_src") / "src"
    patches = " ".join(f'"{p}"' for p in sorted((ROOT / "native" / "llama_patches").glob("*.patch")))
    subprocess.run(["bash", "-c", f'VERSION=0.3.36 CACHE="${{QREALIGN_CACHE:-$HOME/.cache/qrealign-gguf}}" '
                    f'PY=python3; . tools/build/llama_source.sh; llama_unpack "{src}" {patches}'],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    return src / "vendor" / "llama.cpp" / "ggml" / "src" / "ggml-cpu" / "arch" / "arm" / "quants.c"


def _variant(cross: Path, arm_quants: Path, out: Path, march: str, edit: tuple[str, str] | None) -> Path:
    text = arm_quants.read_text()
    if edit is not None:
        assert text.count(edit[0]) == 1, f"the kernel changed; update BROKEN: {edit[0]!r}"
        text = text.replace(*edit)
    src = arm_quants.with_name(f"quants_{out.name}.c")  # beside the original: it includes "../../quants.h"
    src.write_text(text)
    ggml = arm_quants.parents[3]
    obj = out.with_suffix(".o")
    r = subprocess.run(["aarch64-linux-gnu-gcc", *GGML_CPU_CFLAGS, f"-march={march}", f"-I{ggml}", f"-I{ggml / 'ggml-cpu'}",
                        f"-I{ggml.parent / 'include'}", "-c", str(src), "-o", str(obj)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return cross_link(out, cross, [obj, CHECK_SRC, *CODEC_SRC])


def test_neon_kernel_without_dotprod(cross, arm_quants, tmp_path) -> None:
    """The same source for an ARMv8.0 CPU (Raspberry Pi 3/4: NEON without sdot, ggml's widening-multiply path):
    no sdot in the kernel, and it passes the same check."""
    exe = _variant(cross, arm_quants, tmp_path / "armv8", "armv8-a", None)
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--disassemble=ggml_vec_dot_qr5_k128_q8_1", str(exe)],
                         capture_output=True, text=True, check=True).stdout
    assert "smull" in dis and not re.search(r"\bsdot\b", dis)
    d = _run_checker(exe, *_inputs())
    assert max(_dot_errors(d["dot"], d["q"], d["yq"])) <= 1


@pytest.mark.parametrize("bug", list(BROKEN))
def test_broken_neon_kernel_fails_the_check(cross, arm_quants, tmp_path, bug) -> None:
    """A deliberately broken NEON kernel, built and run the same way, fails the exact-dot check."""
    exe = _variant(cross, arm_quants, tmp_path / "broken", "armv8.2-a+dotprod", BROKEN[bug])
    d = _run_checker(exe, *_inputs())
    errs = _dot_errors(d["dot"][-N_RANDOM:], d["q"][-N_RANDOM:], d["yq"][-N_RANDOM:])
    assert min(errs) > 1, errs  # every random row is caught, not just one
    assert max(_dot_errors(d["dotg"], d["q"], d["yq"])) <= 1  # the generic kernel in the same program is fine


def test_ggml_encoder_on_aarch64_without_fma_contraction(cross, arm_quants, device_results, tmp_path) -> None:
    """ggml's own QR5_K128 encoder (patch 0005, ggml-quants.c) on aarch64 writes our bytes once compiled without
    floating-point contraction. As llama.cpp builds it there it need not: GCC fuses a*b+c into fmadd by default
    where FMA is baseline (aarch64; x86's ggml-base gets no FMA flags), and the scale search then rounds
    differently (measured: ~3 % of the bytes). So an ARM llama-quantize writes other bytes than x86's; our codec
    (-ffp-contract=off) does not, and the bundles never quantize on the device."""
    ggml = arm_quants.parents[3]
    obj = tmp_path / "ggml-quants.o"
    r = subprocess.run(["aarch64-linux-gnu-gcc", *GGML_CPU_CFLAGS, "-ffp-contract=off", f"-I{ggml}",
                        f"-I{ggml.parent / 'include'}", "-c", str(ggml / "ggml-quants.c"), "-o", str(obj)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = _run_checker(cross_link(tmp_path / "nofma", cross, [obj, CHECK_SRC, *CODEC_SRC]), *_inputs())
    x, im, _ = _inputs()
    np.testing.assert_array_equal(d["q"], codec.quantize(x, T))
    np.testing.assert_array_equal(d["qi"], codec.quantize(x, T, imatrix=im))
    as_built = float(np.mean(device_results["q"] != d["q"]))
    print(f"ggml's QR5_K128 encoder on aarch64 as built (FMA contraction): {as_built:.2%} of the bytes differ")


# ---- ggml's own op tests on aarch64 -----------------------------------------------------------------------------

def _backend_ops(cross: Path, type_name: str) -> tuple[str, list[str]]:
    """test-backend-ops (built with the patched ARM programs) in test mode on the CPU backend, every op case whose
    parameters name the type; returns the output and the names of the cases that passed."""
    exe = cross / "bin" / "test-backend-ops"
    if not exe.is_file():
        pytest.skip(f"{cross} has no test-backend-ops "
                    "(rebuild: bash tools/build/build_llama_static.sh patched linux-aarch64)")
    r = qemu([exe, "test", "-b", "CPU", "-p", type_name], timeout=3000)
    text = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace"))
    assert r.returncode == 0 and "FAIL" not in text, text[-4000:]
    return text, re.findall(r"^\s*([A-Z_]+\([^)]*" + type_name + r"[^)]*\)): OK$", text, re.M)


def test_backend_ops_qr5_k128_on_aarch64(cross) -> None:
    """ggml's test-backend-ops for QR5_K128 under qemu: patch 0007 makes its reference CPU backend take the generic C
    dot, so every MUL_MAT case compares the NEON (sdot) kernel with it (ggml's NMSE bound), on ggml's own shapes."""
    text, ok = _backend_ops(cross, "qr5_k128")
    ops = sorted({c.split("(", 1)[0] for c in ok})
    print(f"test-backend-ops test -b CPU -p qr5_k128 under qemu: {len(ok)} cases OK "
          f"({', '.join(f'{o} {sum(c.startswith(o + chr(40)) for c in ok)}' for o in ops)})")
    # MUL_MAT is the kernel check (a NEON kernel broken on purpose failed all 14 cases, docs/BENCHMARKS.md); the
    # others (GET_ROWS, SET_ROWS, CPY, MUL_MAT_ID) exercise the type's other CPU paths on aarch64 against themselves
    assert sum(c.startswith("MUL_MAT(") for c in ok) >= 10, text[-4000:]


# ---- llama.cpp on aarch64 --------------------------------------------------------------------------------------

TEXT = ("The quick brown fox jumps over the lazy dog, then naps under the old oak tree. " * 3
        + "Once upon a time there was a small village by the sea where fishermen told stories about storms, "
          "lost ships and the lighthouse keeper who never slept. ") * 4


def _aarch64_vs_x86(cross: Path, gguf: Path, tmp: Path, n_ctx: int) -> dict[str, float]:
    """llama-perplexity of the file on TEXT: the static x86 patched build (the host bundle's) stores its logits, the
    aarch64 build under qemu compares its own with them (KLD x86 || aarch64, how often the top token agrees)."""
    from qrealign_gguf.evaluate.metrics import parse_perplexity_output

    x86 = static_build("patched", "host")
    (tmp / "text.txt").write_text(TEXT)
    base = tmp / "x86.kld"
    ctx = ["-c", str(n_ctx), "-b", str(n_ctx), "-t", "2"]
    r = subprocess.run([str(x86 / "bin" / "llama-perplexity"), "-m", str(gguf), "-f", str(tmp / "text.txt"),
                        "--kl-divergence-base", str(base), *ctx], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and base.is_file(), r.stderr[-3000:]
    r = qemu([cross / "bin" / "llama-perplexity", "-m", gguf, "--kl-divergence-base", base, "--kl-divergence", *ctx],
             timeout=1800)
    text = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert r.returncode == 0, text[-3000:]
    vals = parse_perplexity_output(text)
    # the summary's "Same top p: 98.4 ± 0.5 %", or under 100 scored tokens the last running row's last column
    top = re.findall(r"Same top p:\s*([\d.]+)", text) or re.findall(r"([\d.]+)\s*±\s*[\d.]+\s*%\s*$", text, re.M)
    vals["same_top"] = float(top[-1]) / 100
    print(f"aarch64 (qemu {' '.join(QEMU[1:])}) vs x86, {gguf.name}: {vals}")
    return vals


@pytest.fixture(scope="module")
def tiny_qr(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_qr")
    hf = make_tiny_llama(d / "hf", hidden=384, inter=640, layers=2, heads=6, kv_heads=2, tie=False)
    out = d / "tiny-QR4_K_M.qrealign.gguf"  # QR5_K128 in every layer matrix and token_embd
    convert(hf, out, ConvertOptions(outtype="QR4_K_M"))
    return out


def test_tiny_qr_model_on_aarch64_matches_x86(cross, tiny_qr, tmp_path) -> None:
    """The patched llama.cpp for aarch64 runs a QR4_K_M file under qemu and reproduces the x86 build's logits
    (llama-perplexity, 2 x 64 tokens): the whole model path (get_rows, mat-vec and mat-mul through the NEON kernel,
    Q8_1 activations) agrees with AVX2's up to float summation order."""
    v = _aarch64_vs_x86(cross, tiny_qr, tmp_path, 64)
    # measured: KLD 6.4e-5, same top token 95.5 %. A random model's logits are nearly flat (PPL ~ its vocabulary),
    # so float summation order flips near-ties of the top token; the KLD is the tight check
    assert v["kld"] < 1e-4 and v["same_top"] >= 0.9, v


@pytest.mark.skipif(not FULL, reason=FULL_REASON)
def test_real_model_answers_on_aarch64(cross, tmp_path) -> None:
    """Qwen2.5-Coder-0.5B-Instruct as QR4_K_M (QR5_K128 where Q4_K_M has Q5_0: the 896-wide matrices), bundled for
    linux-aarch64, answers under qemu what the x86 build answers, and its logits agree with x86's."""
    from qrealign_gguf.api import package_model
    from tools.data.fetch_model import fetch_hf

    x86 = static_build("patched", "host")
    gguf = tmp_path / "qwen05-QR4_K_M.qrealign.gguf"
    convert(fetch_hf("qwen05"), gguf, ConvertOptions(outtype="QR4_K_M"))
    bundle = package_model(gguf, tmp_path / "qwen.tar", target="linux-aarch64")
    unpacked = tmp_path / "device"
    unpacked.mkdir()
    subprocess.run(["tar", "xf", str(bundle), "-C", str(unpacked)], check=True)
    (stem,) = unpacked.iterdir()
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=stem, check=True)
    prompt, opts = "What is the capital of France? Answer in one word.", ["-n", "8", "-t", "2"]
    r = subprocess.run(["./run.sh", prompt, *opts], cwd=stem, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "EMULATOR": " ".join(QEMU)})
    assert r.returncode == 0, r.stderr[-3000:]
    want = subprocess.run([str(x86 / "bin" / "llama-completion"), "-m", str(gguf), "-cnv", "-st", "-p", prompt,
                           "--temp", "0", "--no-display-prompt", *opts], capture_output=True, text=True, timeout=600)
    print(f"aarch64 answer: {r.stdout.strip()!r}; x86 answer: {want.stdout.strip()!r}")
    assert "Paris" in r.stdout and r.stdout.strip() == want.stdout.strip()
    v = _aarch64_vs_x86(cross, gguf, tmp_path, 64)
    assert v["kld"] < 1e-3 and v["same_top"] >= 0.95, v
