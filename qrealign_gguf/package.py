"""`qrealign-gguf package`: one tar file to copy onto an edge device -- the GGUF, its provenance, a model card.

A GGUF file already carries its provenance (general.* and qrealign.* keys written by convert); the bundle makes it
readable without our tools and verifiable on the device:

    <stem>/<file>.gguf         the model, unchanged (streamed into the tar, never copied in memory); a split model
                               (<prefix>-00001-of-0000N.gguf, llama.cpp's naming) brings every shard
    <stem>/provenance.json     architecture, tensor types, bits per weight, sha256, general.*/qrealign.* metadata,
                               and the evaluation summary when --eval report.json is given
    <stem>/README.md           model card: what it is, how it was made, how to run it, what was measured
    <stem>/SHA256SUMS          `sha256sum -c SHA256SUMS` on the device
    <stem>/llama_patches/      only for files with qrealign's custom tensor types (QR4_KO, QR5_K128): the patches that make the
    <stem>/BUILD.md            pinned llama.cpp run them, and how to build that for a device (CPU-only ARM, x86)
    <stem>/bin/, <stem>/run.sh with target= (`--target host|linux-aarch64`): llama.cpp built for the device, static,
                               and a script that starts the model there (bundle_target.py)

The tar is uncompressed (quantized weights do not compress) and reproducible: every member's mtime is the GGUF's.
It is written to a temp file next to the output and renamed at the end; an existing bundle is replaced only with
force=True (`--force`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from . import __version__
from .bundle_target import DeviceRuntime, card_lines, check_target, device_runtime, run_sh
from .errors import InputError
from .inspect import GGUFSummary, read_gguf_summary
from .progress import Log

REPO = Path(__file__).resolve().parent.parent
LLAMA_PIN = "llama.cpp as vendored by llama-cpp-python 0.3.36 (PyPI sdist)"

# metadata worth carrying into provenance.json (the vocabulary and merges are not)
_KEEP_PREFIXES = ("general.", "qrealign.")
# llama.cpp's split file names (llama_split_path): it finds shards 2..N from the first one's name
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def patch_dir() -> Traversable:
    """native/llama_patches, their one source: an installed wheel carries a copy in qrealign_gguf/llama_patches
    (setup.py's build step puts it there); a source checkout or editable install reads the checkout's."""
    shipped = resources.files(__package__) / "llama_patches"
    return shipped if shipped.is_dir() else REPO / "native" / "llama_patches"


def _int_meta(summary: GGUFSummary, key: str, path: Path) -> int | None:
    raw = summary.metadata.get(key)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"{path}: {key} is {raw!r}, not a number; the file is damaged") from None


def model_files(path: Path) -> tuple[list[Path], GGUFSummary]:
    """The files the model is ([path], or every shard of a split in order) and their summary (the first file's
    metadata, every file's tensors). A split with a missing, foreign or renamed shard is refused: bundling part of
    a model would give a device a file that does not load."""
    first = read_gguf_summary(path)  # InputError for a missing or unreadable file
    count = _int_meta(first, "split.count", path)
    if count is None or count <= 1:
        return [path], first
    m = _SPLIT_NAME.match(path.name)
    if m is None or int(m["count"]) != count:
        raise InputError(f"{path.name} is one shard of a {count}-file split model but is not named "
                         f"<name>-000NN-of-{count:05d}.gguf, so llama.cpp cannot find the other shards; "
                         "restore the shard names")
    shards = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise InputError(f"{path.name} is one of {count} shards, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} missing next to it; package needs the whole set")
    summaries = [first if s == path else read_gguf_summary(s) for s in shards]
    for i, (s, summ) in enumerate(zip(shards, summaries)):
        if (_int_meta(summ, "split.no", s), _int_meta(summ, "split.count", s)) != (i, count):
            raise InputError(f"{s.name} is not shard {i + 1} of this {count}-file split (its header says "
                             f"{summ.metadata.get('split.no')} of {summ.metadata.get('split.count')}); "
                             "the shards come from different conversions")
    head = summaries[0]
    rows = [t for summ in summaries for t in summ.tensors]
    want = _int_meta(head, "split.tensors.count", shards[0])
    if want is not None and want != len(rows):
        raise InputError(f"{shards[0].name}: the split holds {len(rows)} tensors, its header says {want}; "
                         "the shards come from different conversions")
    return shards, GGUFSummary(head.metadata, rows)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_report(report_path: Path) -> dict[str, Any]:
    """An `eval --json` report, checked before the long hashing: parseable, with per-file sha256 records."""
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        variants = report["variants"]
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
            raise TypeError("variants is not a list of objects")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--eval {report_path}: not an `qrealign-gguf eval --json` report ({e})") from None
    # No file-name fallback: a name says nothing about which bytes were measured (two conversions of one model
    # share it), and a card with another file's numbers is a silent bad bundle. Re-running eval is the fix.
    if not any(isinstance(v.get("sha256"), str) for v in variants):
        raise InputError(f"--eval {report_path} records no sha256 of the files it measured (written by an older "
                         "qrealign-gguf); re-run `qrealign-gguf eval ... --json` so the results can be tied to this file")
    return report


def _measured(variant: dict[str, Any], digests: list[str]) -> bool:
    """Did this report variant measure exactly these bytes? A split model: every shard (eval records them all in
    files_sha256); one file: its sha256 (also in reports that predate files_sha256)."""
    files = variant.get("files_sha256")
    if isinstance(files, list):
        return files == digests
    return len(digests) == 1 and variant.get("sha256") == digests[0]


def _eval_summary(report: dict[str, Any], report_path: Path, gguf_name: str, digests: list[str]) -> dict[str, Any]:
    """The variant of the report that measured this model (every file matched by sha256), without its answers."""
    variants = report["variants"]
    match = [v for v in variants if _measured(v, digests)]
    if not match:
        if any(v.get("sha256") == digests[0] for v in variants):  # the first shard matches, a later one does not
            raise InputError(f"--eval {report_path} measured {gguf_name} but not these {len(digests)} shards as they "
                             "are now (or it records only the first one); re-run `qrealign-gguf eval "
                             f"{gguf_name} ... --json report.json`")
        same_name = [v for v in variants if Path(str(v.get("path", ""))).name == gguf_name]
        if same_name:
            raise InputError(f"--eval {report_path} measured a different file named {gguf_name} (its sha256 "
                             f"differs); evaluate this file: `qrealign-gguf eval {gguf_name} ... --json report.json`")
        names = ", ".join(Path(str(v.get("path", "?"))).name for v in variants) or "none"
        raise InputError(f"--eval {report_path} has no result for {gguf_name} (it measured: {names}); "
                         f"run `qrealign-gguf eval {gguf_name} ... --json report.json` first")
    v = {k: val for k, val in match[0].items() if k != "answers"}
    return {"variant": v, "judge": report.get("judge", {}).get("primary", "keyword"),
            "settings": report.get("settings", {}), "notes": report.get("notes", [])}


def provenance(summary: GGUFSummary, files: list[Path], digests: list[str], evaluation: dict | None,
               runtime: DeviceRuntime | None = None) -> dict[str, Any]:
    """files: the model's files (one, or every shard; llama.cpp is given the first), digests: their sha256;
    runtime: the llama.cpp bundled for a device (package --target), if any."""
    meta = summary.metadata
    return {
        "file": files[0].name,  # what llama.cpp is given; "files" lists every shard of a split
        "bytes": sum(f.stat().st_size for f in files),  # of the whole model
        "sha256": digests[0],
        "files": [{"file": f.name, "bytes": f.stat().st_size, "sha256": d} for f, d in zip(files, digests)],
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
        "target": runtime.provenance() if runtime is not None else None,
    }


def _pct(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "n/a"


def model_card(prov: dict[str, Any]) -> str:
    """A short, factual model card: every line comes from the file or the eval report, nothing is claimed beyond."""
    meta = prov["metadata"]
    realigned = str(meta.get("qrealign.realigned", "False")) == "True"
    name = prov["name"] or Path(prov["file"]).stem
    types = ", ".join(f"{k} x{v}" for k, v in prov["tensor_types"].items())
    shards = len(prov["files"])
    lines = [f"# {name} ({meta.get('qrealign.outtype', 'GGUF')})", "",
             f"`{prov['file']}`: {prov['architecture']} model, {prov['weights']:,} weights, "
             f"{prov['bits_per_weight']:.3f} bits per weight ({types})."
             + (f" Split into {shards} files; keep them together and give llama.cpp the first." if shards > 1 else ""),
             ""]
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
    lines += [f"| sha256 of {f['file']} | {f['sha256']} |" for f in prov["files"]]
    lines += [f"| packaged by | {prov['packaged_by']} |", ""]
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
    if prov.get("target"):
        lines += card_lines(prov)
        lines += ["Elsewhere, with your own llama.cpp build:", ""]
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


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, mode
    tar.addfile(info, io.BytesIO(data))


def package(gguf_path: Path, output: Path | None = None, eval_report: Path | None = None,
            force: bool = False, target: str | None = None, log: Log | None = None) -> Path:
    """Write the bundle; returns its path. Inputs are checked before the (long) hashing starts. target ("host",
    "linux-aarch64"): also bundle llama.cpp built for that device and run.sh (the first build takes ~10
    CPU-minutes; an unknown target or a missing compiler is an InputError before anything is read or written)."""
    gguf_path = Path(gguf_path)
    device = check_target(target) if target is not None else None
    files, summary = model_files(gguf_path)
    m = _SPLIT_NAME.match(files[0].name)
    stem = m["prefix"] if len(files) > 1 and m else files[0].name.removesuffix(".gguf")
    output = Path(output) if output is not None else files[0].with_name(f"{stem}.bundle.tar")
    if output.is_dir():
        output = output / f"{stem}.bundle.tar"
    if output.suffix != ".tar":
        raise InputError(f"{output}: the bundle is a .tar file; give -o NAME.tar or a directory")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent} does not exist; create it or choose another -o")
    if output.exists() and not force:
        raise InputError(f"{output} already exists; pass --force to replace it, or choose another -o")
    report = _read_report(Path(eval_report)) if eval_report is not None else None
    pdir = patch_dir()
    patches = sorted(p.name for p in pdir.iterdir() if p.name.endswith(".patch")) if summary.custom_types else []
    if summary.custom_types and not patches:
        raise InputError(f"{files[0].name} uses custom tensor types but {pdir} holds no llama.cpp patches; "
                         "reinstall qrealign-gguf")

    runtime = device_runtime(device, bool(summary.custom_types), log) if device is not None else None

    digests = [sha256_file(f) for f in files]
    evaluation = (_eval_summary(report, Path(eval_report), files[0].name, digests)
                  if report is not None else None)
    prov = provenance(summary, files, digests, evaluation, runtime)
    mtime = int(files[0].stat().st_mtime)
    texts: dict[str, bytes] = {
        "provenance.json": (json.dumps(prov, indent=2, ensure_ascii=False) + "\n").encode(),
        "README.md": model_card(prov).encode(),
    }
    if patches:
        texts["BUILD.md"] = build_md(patches).encode()
        texts.update({f"llama_patches/{p}": (pdir / p).read_bytes() for p in patches})
    programs: dict[str, Path] = {}  # bundle name -> file, streamed like the GGUF
    if runtime is not None:
        texts["run.sh"] = run_sh(runtime, files[0].name, prov["has_chat_template"]).encode()
        programs = {f"bin/{b.name}": b for b in runtime.binaries}
    sums = [f"{d}  {f.name}" for f, d in zip(files, digests)]
    sums += [f"{sha256_file(p)}  {n}" for n, p in programs.items()]
    sums += [f"{hashlib.sha256(b).hexdigest()}  {n}" for n, b in texts.items()]
    texts["SHA256SUMS"] = ("\n".join(sums) + "\n").encode()

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    except OSError as e:
        raise InputError(f"cannot write into {output.parent}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            streamed = [(path.name, path, 0o644) for path in files] + [(n, p, 0o755) for n, p in programs.items()]
            for name, path, mode in streamed:
                info = tar.gettarinfo(str(path), arcname=f"{stem}/{name}")
                info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = mtime, 0, 0, "", "", mode
                with path.open("rb") as g:
                    tar.addfile(info, g)
            for name, data in texts.items():
                _add_bytes(tar, f"{stem}/{name}", data, mtime, 0o755 if name == "run.sh" else 0o644)
        os.replace(tmp, output)
    except OSError as e:  # a full disk, say: one line, and the partial temp file goes
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"writing {output} failed: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output
