"""`qrealign-gguf package`: one tar file to copy onto an edge device -- the GGUF, its provenance, a model card.

A GGUF file already carries its provenance (general.* and qrealign.* keys written by convert); the bundle makes it
readable without our tools and verifiable on the device:

    <stem>/<file>.gguf         the model, unchanged (streamed into the tar, never copied in memory)
    <stem>/provenance.json     architecture, tensor types, bits per weight, sha256, general.*/qrealign.* metadata,
                               and the evaluation summary when --eval report.json is given
    <stem>/README.md           model card: what it is, how it was made, how to run it, what was measured
    <stem>/SHA256SUMS          `sha256sum -c SHA256SUMS` on the device
    <stem>/llama_patches/      only for files with qrealign's custom tensor types (QR4_KO, QR5_K128): the patches that make the
    <stem>/BUILD.md            pinned llama.cpp run them, and how to build that for a device (CPU-only ARM, x86)

The tar is uncompressed (quantized weights do not compress) and reproducible: every member's mtime is the GGUF's.
It is written to a temp file next to the output and renamed at the end.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError
from .inspect import GGUFSummary, read_gguf_summary

REPO = Path(__file__).resolve().parent.parent
PATCH_DIR = REPO / "native" / "llama_patches"
LLAMA_PIN = "llama.cpp as vendored by llama-cpp-python 0.3.36 (PyPI sdist)"

# metadata worth carrying into provenance.json (the vocabulary and merges are not)
_KEEP_PREFIXES = ("general.", "qrealign.")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _eval_summary(report_path: Path, gguf_name: str) -> dict[str, Any]:
    """The variant of an `eval --json` report that measured this file (by file name), without its answers."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        variants = report["variants"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--eval {report_path}: not an `qrealign-gguf eval --json` report ({e})") from None
    match = [v for v in variants if Path(str(v.get("path", ""))).name == gguf_name]
    if not match:
        names = ", ".join(Path(str(v.get("path", "?"))).name for v in variants) or "none"
        raise InputError(f"--eval {report_path} has no result for {gguf_name} (it measured: {names}); "
                         f"run `qrealign-gguf eval {gguf_name} ... --json report.json` first")
    v = {k: val for k, val in match[0].items() if k != "answers"}
    return {"variant": v, "judge": report.get("judge", {}).get("primary", "keyword"),
            "settings": report.get("settings", {}), "notes": report.get("notes", [])}


def provenance(summary: GGUFSummary, gguf_path: Path, digest: str, evaluation: dict | None) -> dict[str, Any]:
    meta = summary.metadata
    return {
        "file": gguf_path.name,
        "bytes": gguf_path.stat().st_size,
        "sha256": digest,
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "bits_per_weight": round(summary.bits_per_weight, 4),
        "weights": summary.n_params,
        "tensor_types": summary.type_counts,
        "custom_types": summary.custom_types,
        "runtime": f"{LLAMA_PIN}" + (" + qrealign-gguf native/llama_patches" if summary.custom_types else ""),
        "has_chat_template": "tokenizer.chat_template" in meta,
        "metadata": {k: v for k, v in meta.items() if k.startswith(_KEEP_PREFIXES)},
        "packaged_by": f"qrealign-gguf {__version__}",
        "evaluation": evaluation,
    }


def _pct(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "n/a"


def model_card(prov: dict[str, Any]) -> str:
    """A short, factual model card: every line comes from the file or the eval report, nothing is claimed beyond."""
    meta = prov["metadata"]
    realigned = str(meta.get("qrealign.realigned", "False")) == "True"
    name = prov["name"] or Path(prov["file"]).stem
    types = ", ".join(f"{k} x{v}" for k, v in prov["tensor_types"].items())
    lines = [f"# {name} ({meta.get('qrealign.outtype', 'GGUF')})", "",
             f"`{prov['file']}`: {prov['architecture']} model, {prov['weights']:,} weights, "
             f"{prov['bits_per_weight']:.3f} bits per weight ({types}).", ""]
    if realigned:
        lines += ["Quantized with **Q-realign** by qrealign-gguf: block scales and rounding were chosen so that the "
                  "file keeps the fine-tuned model's behaviour on benign prompts and moves harmful prompts towards the "
                  "aligned reference model's refusal side (per-layer linear safety probes). Settings:", ""]
        lines += [f"- `{k}` = {v}" for k, v in meta.items() if k.startswith("qrealign.realign")]
        lines.append("")
    else:
        lines += ["Converted by qrealign-gguf without realignment (plain quantization of the source model).", ""]
    lines += ["## Provenance", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in meta.items()]
    lines += [f"| sha256 | {prov['sha256']} |", f"| packaged by | {prov['packaged_by']} |", ""]
    ev = prov.get("evaluation")
    lines += ["## Measured", ""]
    if ev:
        v = ev["variant"]
        h, o, b = v.get("harmful") or {}, v.get("overrefusal") or {}, v.get("benign") or {}
        lines += [f"From `qrealign-gguf eval` (judge: {ev['judge']}; greedy decoding in llama.cpp):", "",
                  "| harmful refused | over-refusal | benign answered | ROUGE-L vs reference | KLD to reference | PPL |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {_pct(h.get('refusal'))} ({h.get('n', 0)} prompts) | {_pct(o.get('refusal'))} ({o.get('n', 0)}) "
                  f"| {_pct(b.get('answered'))} ({b.get('n', 0)}) | {b.get('rouge_l', 'n/a')} | {v.get('kld', 'n/a')} "
                  f"| {v.get('ppl', 'n/a')} |", ""]
        lines += [f"Note: {n}" for n in ev.get("notes", [])]
        lines.append("")
    else:
        lines += ["Nothing measured was bundled (pass `--eval report.json` from `qrealign-gguf eval --json`). "
                  "Do not assume refusal behaviour without measuring it.", ""]
    lines += ["## Run", ""]
    if prov["custom_types"]:
        lines += [f"**This file uses qrealign-gguf's custom tensor type(s) {', '.join(prov['custom_types'])}. Stock "
                  "llama.cpp and apps built on it cannot load it** (\"invalid ggml type\"). Build the patched "
                  "llama.cpp from `llama_patches/` as `BUILD.md` describes, then:", ""]
    else:
        lines += ["Runs in stock llama.cpp (and apps built on it):", ""]
    lines += ["```", "sha256sum -c SHA256SUMS", f"llama-cli -m {prov['file']} -cnv" + ("" if prov["has_chat_template"]
              else " --chat-template chatml"), "```", "",
              "## License", "", f"The weights inherit the license of the source model "
              f"({meta.get('general.license', 'see the source model card')}).", ""]
    return "\n".join(lines)


def build_md(patches: list[str]) -> str:
    plist = "\n".join(f"    git apply llama_patches/{p}" for p in patches)
    return f"""# Building the patched llama.cpp for a device

The custom tensor types need {LLAMA_PIN} with these patches applied (they add the type to ggml: type traits,
reference quantize/dequantize, CPU dot product, get_rows; CUDA dequantize, get_rows and mat-vec). The CPU code is
portable C, so any target llama.cpp builds for runs it (x86-64, ARMv8 phones and boards). The CUDA kernels
(`-DGGML_CUDA=ON`) are compiled in qrealign-gguf's tests but have not been run on a GPU yet; there are no
Metal/Vulkan kernels (those backends leave the custom type's mat-muls on the CPU).

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
{plist}

On the device itself (e.g. Raspberry Pi 5, Jetson CPU), native CPU features:

    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j --target llama-cli llama-completion

Cross-compiling for 64-bit ARM Linux from x86-64 (Debian/Ubuntu: `apt install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu`):

    cmake -B build-arm64 -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \\
          -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \\
          -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod -DGGML_OPENMP=OFF \\
          -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build-arm64 -j --target llama-cli llama-completion

Android: the same with the NDK toolchain file (`-DCMAKE_TOOLCHAIN_FILE=$NDK/build/cmake/android.toolchain.cmake
-DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-28`). Check the build with `llama-cli -m <file> -p Hello -n 16`.
"""


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def package(gguf_path: Path, output: Path | None = None, eval_report: Path | None = None) -> Path:
    """Write the bundle; returns its path. Inputs are checked before the (long) hashing starts."""
    gguf_path = Path(gguf_path)
    summary = read_gguf_summary(gguf_path)  # InputError for a missing or unreadable file
    stem = gguf_path.name.removesuffix(".gguf")
    output = Path(output) if output is not None else gguf_path.with_name(f"{stem}.bundle.tar")
    if output.is_dir():
        output = output / f"{stem}.bundle.tar"
    if output.suffix != ".tar":
        raise InputError(f"{output}: the bundle is a .tar file; give -o NAME.tar or a directory")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent} does not exist; create it or choose another -o")
    evaluation = _eval_summary(Path(eval_report), gguf_path.name) if eval_report is not None else None
    patches = sorted(p.name for p in PATCH_DIR.glob("*.patch")) if summary.custom_types else []
    if summary.custom_types and not patches:
        raise InputError(f"{gguf_path.name} uses custom tensor types but {PATCH_DIR} holds no patches")

    digest = sha256_file(gguf_path)
    prov = provenance(summary, gguf_path, digest, evaluation)
    mtime = int(gguf_path.stat().st_mtime)
    texts: dict[str, bytes] = {
        "provenance.json": (json.dumps(prov, indent=2, ensure_ascii=False) + "\n").encode(),
        "README.md": model_card(prov).encode(),
    }
    if patches:
        texts["BUILD.md"] = build_md(patches).encode()
        texts.update({f"llama_patches/{p}": (PATCH_DIR / p).read_bytes() for p in patches})
    sums = [f"{digest}  {gguf_path.name}"] + [f"{hashlib.sha256(b).hexdigest()}  {n}" for n, b in texts.items()]
    texts["SHA256SUMS"] = ("\n".join(sums) + "\n").encode()

    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tar.gettarinfo(str(gguf_path), arcname=f"{stem}/{gguf_path.name}")
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = mtime, 0, 0, "", "", 0o644
            with gguf_path.open("rb") as g:
                tar.addfile(info, g)
            for name, data in texts.items():
                _add_bytes(tar, f"{stem}/{name}", data, mtime)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output
