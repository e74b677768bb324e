"""Differential mutation fuzzer for the two untrusted file formats the converter reads.

    python tests/fuzz_inputs.py gguf --cases 400 --seed 1 --json out.json
    python tests/fuzz_inputs.py safetensors --cases 400 --seed 1

Each case mutates a small valid seed file (byte flips, huge length words, truncation, spliced bytes, and
structured edits of the safetensors JSON header), then asks two readers:

- ours, the way the CLI reads the file (GGUF: `read_gguf_summary`, the reader of `inspect` / `package` /
  `convert --imatrix`; safetensors: `HFModel` + loading every tensor): it must either accept, or raise InputError.
  Any other exception is a bug (the user would see a traceback or "internal error").
- the reference implementation: for GGUF, ggml's own `gguf_init_from_file` from the pinned libggml-base (the
  loader llama.cpp runs) plus llama.cpp's "tensor data within the file" rule; for safetensors, the safetensors
  package itself (`safe_open`, every tensor read).

Accepting what the reference rejects is a failure: we would bundle, inspect as fine, or convert from a file that
llama.cpp / safetensors refuse. Rejecting what it accepts is allowed (we may be stricter) and only counted.
For safetensors, an accepted file must also give the reference's exact values.

The driver runs in a child process of the test (tests/test_fuzz_inputs.py) under `ulimit -v` and a time limit, so
a length word that makes a reader allocate without bound or loop forever fails the test instead of the machine.
The reference GGUF reader runs in its own child (a C abort there must not look like our failure).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HUGE = (2**64 - 1, 2**63, 2**62 + 7, 2**32, 2**31 - 1, 1 << 40, 0xFFFFFFFF)


# -- seeds ---------------------------------------------------------------------------------------------------------
def gguf_seed(path: Path) -> None:
    """A small GGUF with every value kind llama.cpp files carry and a few tensor types."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("fuzz-seed")
    w.add_uint32("llama.context_length", 128)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("general.flag", True)
    w.add_int64("general.some_i64", -5)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "world", "\u00e9t\u00e9"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, -3.0, -4.0])
    w.add_array("general.tags", [1, 2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((5, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(32).astype(np.float16))
    q8 = rng.integers(0, 255, size=(2, 34), dtype=np.uint8)  # 2 rows of one Q8_0 block (32 weights, 34 bytes)
    q8[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    q4k = np.zeros((1, 144), dtype=np.uint8)  # one Q4_K super-block (256 weights, 144 bytes)
    w.add_tensor("blk.0.ffn_down.weight", q4k, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def safetensors_seed(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(4, 8, generator=g), "b.weight": torch.randn(3, 5, generator=g).half(),
               "c.bias": torch.randn(6, generator=g).bfloat16(), "d.weight": torch.randn(2, 2, 2, generator=g)},
              str(path), metadata={"format": "pt"})


# -- mutations -----------------------------------------------------------------------------------------------------
def _header_end_gguf(data: bytes) -> int:
    """Where the tensor data starts (mutations aim at the header: the data region is just numbers)."""
    import gguf

    try:
        return int(gguf.GGUFReader(_tmp_bytes(data)).data_offset)
    except Exception:  # noqa: BLE001 - the seed is valid; fall back to the whole file
        return len(data)


def _tmp_bytes(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=".gguf")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def mutate_bytes(data: bytes, rng: random.Random, hot: int) -> bytes:
    """One or a few byte-level edits, mostly inside the first `hot` bytes."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(7)
        pos = rng.randrange(min(hot, len(b))) if b else 0
        if op == 0:  # flip bits
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1:  # a random byte
            b[pos] = rng.randrange(256)
        elif op in (2, 3):  # a length-sized word set to something huge or off by a little
            pos -= pos % 4 if op == 2 else 0
            if pos + 8 <= len(b):
                old = struct.unpack_from("<Q", b, pos)[0]
                new = rng.choice(HUGE) if op == 2 else max(0, old + rng.choice((-9, -1, 1, 8, 4096)))
                struct.pack_into("<Q", b, pos, new % 2**64)
        elif op == 4:  # truncate
            del b[rng.randrange(len(b) + 1):]
        elif op == 5:  # delete a span
            del b[pos:pos + rng.randrange(1, 17)]
        else:  # duplicate a span (shifts everything after it)
            b[pos:pos] = b[pos:pos + rng.randrange(1, 17)]
    return bytes(b)


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """Half the time a structured edit of one header entry (re-serialized with a correct length), else bytes."""
    n = struct.unpack_from("<Q", data, 0)[0]
    if rng.random() < 0.4:
        return mutate_bytes(data, rng, hot=8 + n)
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    e = header[name]
    op = rng.randrange(12)
    if op == 0:
        e["data_offsets"] = e["data_offsets"][::-1]
    elif op == 1:
        e["data_offsets"][rng.randrange(2)] += rng.choice((-4, -2, -1, 1, 2, 4, 10**6, 2**40))
    elif op == 2:
        e["shape"][rng.randrange(len(e["shape"]))] += rng.choice((-1, 1, -100, 2**31))
    elif op == 3:
        e["shape"] = [-d for d in e["shape"]]
    elif op == 4:
        del e[rng.choice(("data_offsets", "shape", "dtype"))]
    elif op == 5:
        e["dtype"] = rng.choice(("F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "F8_E4M3", "Q4", "", 5))
    elif op == 6:
        other = header[rng.choice(names)]
        e["data_offsets"] = list(other["data_offsets"])  # alias another tensor's bytes
    elif op == 7:
        e["shape"] = e["shape"] + [1] if rng.random() < 0.5 else e["shape"][:-1]
    elif op == 8:
        header[name] = rng.choice((None, 7, "x", [1, 2], {}))
    elif op == 9:
        e["data_offsets"] = [rng.choice((0.5, "0", None)), e["data_offsets"][1]]
    elif op == 10:
        e["shape"] = [rng.choice((1.5, "4", None, True))] + e["shape"][1:]
    else:  # a tensor whose bytes lie past the end
        header[name + ".extra"] = {"dtype": "F32", "shape": [4], "data_offsets": [len(data), len(data) + 16]}
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data[8 + n:]


# -- readers -------------------------------------------------------------------------------------------------------
def ours_gguf(path: Path) -> str:
    """'accept' / 'reject: ...'; anything but InputError propagates (a bug)."""
    from qrealign_gguf.errors import InputError
    from qrealign_gguf.inspect import read_gguf_summary

    try:
        read_gguf_summary(path)
    except InputError as e:
        return f"reject: {e}"
    return "accept"


def ours_safetensors(folder: Path) -> tuple[str, dict[str, np.ndarray]]:
    from qrealign_gguf.errors import InputError
    from qrealign_gguf.hf_model import HFModel

    try:
        m = HFModel(folder)
        return "accept", {n: m.load(n) for n in m.tensor_names()}
    except InputError as e:
        return f"reject: {e}", {}


def reference_safetensors(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "accept", {n: f.get_tensor(n).float().numpy() for n in f.keys()}
    except Exception as e:  # noqa: BLE001 - any refusal of the reference reader
        return f"reject: {type(e).__name__}: {str(e)[:80]}", {}


_GGML_CHILD = r"""
import os, sys
from cffi import FFI
ffi = FFI()
ffi.cdef('''
struct gguf_init_params { bool no_alloc; void ** ctx; };
void * gguf_init_from_file(const char * fname, struct gguf_init_params params);
void gguf_free(void * ctx);
size_t gguf_get_data_offset(const void * ctx);
int64_t gguf_get_n_tensors(const void * ctx);
size_t gguf_get_tensor_offset(const void * ctx, int64_t tensor_id);
size_t gguf_get_tensor_size(const void * ctx, int64_t tensor_id);
''')
lib = ffi.dlopen(sys.argv[1])
for line in sys.stdin:
    path = line.strip()
    ctx = lib.gguf_init_from_file(path.encode(), ffi.new('struct gguf_init_params *', [True, ffi.NULL])[0])
    if ctx == ffi.NULL:
        print('reject', flush=True)
        continue
    # llama.cpp's model loader: every tensor's data must lie inside the file
    size, base = os.path.getsize(path), lib.gguf_get_data_offset(ctx)
    ok = all(base + lib.gguf_get_tensor_offset(ctx, i) + lib.gguf_get_tensor_size(ctx, i) <= size
             for i in range(lib.gguf_get_n_tensors(ctx)))
    lib.gguf_free(ctx)
    print('accept' if ok else 'reject', flush=True)
"""


def reference_gguf(paths: list[Path], lib: Path) -> list[str]:
    """ggml's verdict per file, one child process for all of them (a file that aborts ggml reads as 'reject')."""
    verdicts: list[str] = []
    todo = list(paths)
    while todo:
        p = subprocess.run([sys.executable, "-c", _GGML_CHILD, str(lib)], input="\n".join(map(str, todo)) + "\n",
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=600)
        got = p.stdout.split()
        verdicts += got
        todo = todo[len(got):]
        if todo:  # the child died on todo[0]
            verdicts.append("reject")
            todo = todo[1:]
    return verdicts


# -- campaigns -----------------------------------------------------------------------------------------------------
def run_gguf(cases: int, seed: int, lib: Path, work: Path) -> dict:
    src = work / "seed.gguf"
    gguf_seed(src)
    data = src.read_bytes()
    hot = _header_end_gguf(data)
    rng = random.Random(seed)
    paths, ours, errors = [], [], []
    for i in range(cases):
        p = work / f"m{i:05d}.gguf"
        p.write_bytes(mutate_bytes(data, rng, hot))
        paths.append(p)
    for p in paths:
        try:
            ours.append(ours_gguf(p))
        except Exception as e:  # noqa: BLE001 - the bug class this fuzzer hunts
            ours.append("crash")
            errors.append(f"{p.name}: {type(e).__name__}: {e}"[:300])
    refs = reference_gguf(paths, lib)
    lax = [p.name for p, o, r in zip(paths, ours, refs) if o == "accept" and r != "accept"]
    return _summary("gguf", cases, ours, refs, errors, lax, [])


def run_safetensors(cases: int, seed: int, work: Path) -> dict:
    src = work / "seed.safetensors"
    safetensors_seed(src)
    data = src.read_bytes()
    rng = random.Random(seed)
    ours, refs, errors, lax, wrong = [], [], [], [], []
    for i in range(cases):
        folder = work / f"m{i:05d}"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        f = folder / "model.safetensors"
        f.write_bytes(mutate_safetensors(data, rng))
        try:
            verdict, got = ours_safetensors(folder)
        except Exception as e:  # noqa: BLE001
            verdict, got = "crash", {}
            errors.append(f"{folder.name}: {type(e).__name__}: {e}"[:300])
        ref, want = reference_safetensors(f)
        ours.append(verdict)
        refs.append(ref)
        if verdict == "accept" and ref != "accept":
            lax.append(f"{folder.name}: reference says {ref}")
        elif verdict == "accept" and (got.keys() != want.keys() or
                                      any(not np.array_equal(got[k], want[k]) for k in got)):
            wrong.append(folder.name)
    return _summary("safetensors", cases, ours, refs, errors, lax, wrong)


def _summary(fmt: str, cases: int, ours: list[str], refs: list[str], errors: list[str], lax: list[str],
             wrong: list[str]) -> dict:
    acc = [o == "accept" for o in ours]
    ref_acc = [r == "accept" for r in refs]
    return {"format": fmt, "cases": cases, "accepted": sum(acc), "rejected": sum(o.startswith("reject") for o in ours),
            "reference_accepted": sum(ref_acc),
            "stricter": sum(r and not a for a, r in zip(acc, ref_acc)),
            "crashes": errors, "accepted_but_reference_rejects": lax, "wrong_values": wrong}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("format", choices=("gguf", "safetensors"))
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ggml-lib", type=Path, help="libggml-base.so of the pinned llama.cpp (GGUF reference)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        if a.format == "gguf":
            if a.ggml_lib is None:
                from qrealign_gguf.llamacpp import find_llama
                a.ggml_lib = find_llama().lib_dir / "libggml-base.so"
            res = run_gguf(a.cases, a.seed, a.ggml_lib, Path(d))
        else:
            res = run_safetensors(a.cases, a.seed, Path(d))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text)
    print(text)
    return 1 if res["crashes"] or res["accepted_but_reference_rejects"] or res["wrong_values"] else 0


if __name__ == "__main__":
    sys.exit(main())
