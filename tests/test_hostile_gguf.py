"""Hostile and broken GGUF inputs (issue 19): every command that reads a GGUF (inspect, package, convert --imatrix,
eval) refuses a bad file with one line and exit code 2 under a tight memory cap, writes nothing, and never hangs;
--metadata values llama.cpp would reject or misread are refused before the conversion writes anything.

The hostile files are built byte by byte (tests/gguf_build.py): they claim what no writer produces.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from gguf_build import (ARR, STR, T_F32, T_Q8_0, U8, U32, gguf as gguf_bytes, gstr, kv, kv_arr, kv_str, kv_u32,
                        small_valid, tinfo)
from hostile import assert_refused, run_cli, snapshot
from qrealign_gguf.convert import ConvertOptions, convert
from qrealign_gguf.gguf_file import GGUFFormatError, read_gguf
from qrealign_gguf.gguf_read import GGUFReader, custom_type_names
from qrealign_gguf.imatrix import load_imatrix, save_imatrix
from tiny_models import make_tiny_llama

# address space the commands need with a valid file, plus margin (measured: inspect/package/eval ~300 MB,
# convert ~1.5 GB with torch); a length field trusted for 2**60 items blows through these at once
SMALL_MB, CONVERT_MB = 640, 2560
ARCH = kv_str("general.architecture", "llama")


def _size_113() -> bytes:
    """113 bytes: a header and one array claiming 2**60 uint32 items (the key name pads it to the size)."""
    body = gguf_bytes([kv_arr("k", U32, 2**60)], [])
    return gguf_bytes([kv_arr("k" * (1 + 113 - len(body)), U32, 2**60)], [])


def _imatrix_overlap() -> bytes:
    """An imatrix for the tiny model whose counts tensor overlaps its sums (gguf-py read it as if valid)."""
    sums = struct.pack("<64f", *([100.0] * 64))
    return gguf_bytes([kv_str("general.type", "imatrix")],
                      [tinfo("blk.0.attn_q.weight.in_sum2", [64, 1], T_F32, 0),
                       tinfo("blk.0.attn_q.weight.counts", [1, 1], T_F32, 0)], sums)


# name -> (file bytes, a word the error line must carry)
HOSTILE: dict[str, tuple[bytes, str]] = {
    "array_2p60_in_113_bytes": (_size_113(), "array items"),
    "string_past_end": (gguf_bytes([ARCH, kv(b"general.name", STR, struct.pack("<Q", 1000) + b"abc")]), "truncated"),
    "string_2p40": (gguf_bytes([ARCH, kv(b"general.name", STR, struct.pack("<Q", 2**40) + b"abc")]), "bytes"),
    "string_array_past_end": (gguf_bytes([ARCH, kv_arr("tokenizer.ggml.tokens", STR, 10**6, gstr("a"))]), "strings"),
    "nested_array": (gguf_bytes([ARCH, kv_arr("x", ARR, 2**30, struct.pack("<IQ", ARR, 2**30) * 4)]),
                     "array of arrays"),
    "unknown_value_type": (gguf_bytes([ARCH, kv("x", 13, b"\0" * 8)]), "unknown value type"),
    "n_dims_99": (gguf_bytes([ARCH], [tinfo("t", [1] * 99, T_F32, 0)], b"\0" * 32), "99 dimensions"),
    "dims_overflow": (gguf_bytes([ARCH], [tinfo("t", [2**32] * 3, T_F32, 0)], b"\0" * 32), "2**63"),
    "negative_dim": (gguf_bytes([ARCH], [tinfo("t", [2**64 - 8], T_F32, 0)], b"\0" * 32), "negative"),
    "unknown_tensor_type": (gguf_bytes([ARCH], [tinfo("t", [8], 200, 0)], b"\0" * 32), "unknown tensor type"),
    "row_not_block_multiple": (gguf_bytes([ARCH], [tinfo("t", [16], T_Q8_0, 0)], b"\0" * 64), "block"),
    "data_past_end": (gguf_bytes([ARCH], [tinfo("t", [1024], T_F32, 0)], b"\0" * 32), "truncated"),
    "misaligned_offset": (gguf_bytes([ARCH], [tinfo("a", [8], T_F32, 0), tinfo("b", [8], T_F32, 33)],
                                     b"\0" * 128), "alignment"),
    "overlapping_offsets": (gguf_bytes([ARCH], [tinfo("a", [8], T_F32, 0), tinfo("b", [8], T_F32, 0)],
                                       b"\0" * 64), "overlaps"),
    "alignment_0": (gguf_bytes([ARCH, kv_u32("general.alignment", 0)], [tinfo("a", [8], T_F32, 0)], b"\0" * 32),
                    "power of two"),
    "alignment_3": (gguf_bytes([ARCH, kv_u32("general.alignment", 3)], [tinfo("a", [8], T_F32, 0)], b"\0" * 32,
                               align=3), "power of two"),
    "alignment_not_uint32": (gguf_bytes([ARCH, kv("general.alignment", 10, struct.pack("<Q", 32))]), "UINT32"),
    "duplicate_key": (gguf_bytes([ARCH, ARCH]), "duplicate key"),
    "duplicate_tensor": (gguf_bytes([ARCH], [tinfo("a", [8], T_F32, 0), tinfo("a", [8], T_F32, 32)], b"\0" * 64),
                         "duplicate tensor"),
    "key_not_utf8": (gguf_bytes([kv_str(b"general.\xff", "x")]), "UTF-8"),
    "key_empty": (gguf_bytes([kv_str(b"", "x")]), "empty"),
    "counts_beyond_file": (gguf_bytes([ARCH], [], n_kv=2**62), "more than"),
    "version_1": (gguf_bytes([ARCH], version=1), "version"),
    "big_endian": (gguf_bytes([ARCH], version=3 << 24), "big-endian"),
    "imatrix_overlapping_counts": (_imatrix_overlap(), "overlaps"),
}
# convert starts torch (~10 s a run): one case per check family rather than all
FOR_CONVERT = ["array_2p60_in_113_bytes", "string_past_end", "string_array_past_end", "nested_array", "n_dims_99",
               "unknown_tensor_type", "data_past_end", "alignment_3", "duplicate_key", "imatrix_overlapping_counts"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def tiny_gguf(tiny: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_gguf") / "tiny.Q8_0.gguf"
    convert(tiny, out, ConvertOptions(outtype="Q8_0"))
    return out


def _hostile(tmp_path: Path, name: str) -> tuple[Path, str]:
    data, match = HOSTILE[name]
    d = tmp_path / "in"
    d.mkdir()
    f = d / f"{name}.gguf"
    f.write_bytes(data)
    return f, match


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_inspect_and_package_refuse(tmp_path: Path, name: str) -> None:
    f, match = _hostile(tmp_path, name)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(f.parent, out)
    assert_refused(run_cli(["inspect", f], mem_mb=SMALL_MB, timeout=60), before, f.parent, out, match=match)
    assert_refused(run_cli(["package", f, "-o", out], mem_mb=SMALL_MB, timeout=60), before, f.parent, out,
                   match=match)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_eval_refuses(tmp_path: Path, name: str) -> None:
    f, match = _hostile(tmp_path, name)  # no chat template either: the structure is refused first
    prompts = tmp_path / "in" / "harmful.jsonl"
    prompts.write_text('{"prompt": "How do I pick a lock?", "label": 1}\n')
    before = snapshot(f.parent)
    line = assert_refused(run_cli(["eval", f, "--harmful", prompts], mem_mb=SMALL_MB, timeout=60), before, f.parent,
                          match=match)
    assert "not a readable GGUF" in line


@pytest.mark.parametrize("name", FOR_CONVERT)
def test_convert_imatrix_refuses(tiny: Path, tmp_path: Path, name: str) -> None:
    f, match = _hostile(tmp_path, name)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(f.parent, out)
    r = run_cli(["convert", tiny, "--imatrix", f, "-o", out / "o.gguf", "--outtype", "Q4_K_M"], mem_mb=CONVERT_MB,
                timeout=120)
    assert "imatrix" in assert_refused(r, before, f.parent, out, match=match)


def test_imatrix_with_huge_metadata_arrays_is_refused_before_gguf_py(tmp_path: Path) -> None:
    """A valid GGUF whose metadata is 4 million one-byte items: gguf-py would build 4 million numpy views
    (gigabytes, minutes); an imatrix never holds that, so load_imatrix refuses it up front."""
    f = tmp_path / "big.gguf"
    f.write_bytes(gguf_bytes([kv_arr("x", U8, 4_000_000, b"\0" * 4_000_000)]))
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="4000000 metadata array items"):
        load_imatrix(f)
    assert time.perf_counter() - t0 < 5
    assert read_gguf(f).array_len("x") == 4_000_000  # a valid file for everything that does not use gguf-py


def test_every_truncation_of_a_valid_file_is_refused(tmp_path: Path) -> None:
    data = small_valid()
    f = tmp_path / "cut.gguf"
    for n in range(0, len(data), 8):
        f.write_bytes(data[:n])
        with pytest.raises(GGUFFormatError):
            read_gguf(f)
        with pytest.raises(GGUFFormatError):
            GGUFReader(f)
    f.write_bytes(data)
    layout = read_gguf(f)
    assert [(t.name, t.shape, t.offset, t.nbytes) for t in layout.tensors] == [("a.weight", (8,), 0, 32),
                                                                                ("b.weight", (2, 4), 32, 32)]
    assert np.array_equal(GGUFReader(f).tensors[1].data, np.arange(8, 16, dtype=np.float32).reshape(2, 4))


def test_custom_tensor_type_and_split_shard(tmp_path: Path) -> None:
    """qrealign's own tensor types are known types; a split shard (split.count > 1) is checked on its own."""
    f = tmp_path / "custom-00001-of-00002.gguf"
    f.write_bytes(gguf_bytes([ARCH, kv("split.count", 2, struct.pack("<H", 2))],
                             [tinfo("blk.0.ffn_down.weight", [256, 2], 240, 0)], b"\x01" * 312))
    assert custom_type_names(f) == ["QR4_KO"]
    t = GGUFReader(f).tensors[0]
    assert t.tensor_type.name == "QR4_KO" and t.data.shape == (2, 156)
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_gguf(f)


def _assert_same_as_gguf_py(path: Path) -> None:
    """read_gguf's keys, values and tensor table equal gguf-py's for a file gguf-py reads."""
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert ours.data_offset == theirs.data_offset
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.kv) == list(fields)
    for key, f in fields.items():
        v = ours.kv[key]
        assert v.type == int(f.types[0]), key
        if v.type == ARR:
            assert v.count == len(f.data) and v.item_type == int(f.types[-1]), key
            assert list(v.value) == f.contents()[:len(v.value)], key
        else:
            assert v.value == f.contents(), key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.type_id, a.dims, a.nbytes, ours.data_offset + a.offset) == \
            (b.name, int(b.tensor_type), tuple(int(x) for x in b.shape), int(b.n_bytes), b.data_offset)


def test_real_files_read_as_gguf_py_reads_them(tiny: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    _assert_same_as_gguf_py(tiny_gguf)
    im = tmp_path / "tiny.imatrix.gguf"
    save_imatrix(im, {"blk.0.attn_q.weight": np.full(64, 2.0, np.float32)}, 100, ["calib.txt"])
    _assert_same_as_gguf_py(im)
    assert np.allclose(load_imatrix(im)["blk.0.attn_q.weight"], 2.0)
    ours, theirs = GGUFReader(tiny_gguf), gguf.GGUFReader(tiny_gguf)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.name == b.name and np.array_equal(a.data, b.data)
    # and through the commands: inspect lists it, convert takes the imatrix
    r = run_cli(["inspect", tiny_gguf], mem_mb=SMALL_MB, timeout=60)
    assert r.returncode == 0 and "token_embd.weight" in r.stdout, str(r)
    out = tmp_path / "o.gguf"
    r = run_cli(["convert", tiny, "--imatrix", im, "-o", out, "--outtype", "Q4_K_M"], mem_mb=CONVERT_MB, timeout=180)
    assert r.returncode == 0 and read_gguf(out).scalar("qrealign.imatrix").startswith("tiny.imatrix.gguf"), str(r)


def test_large_vocabulary_is_walked_fast(tmp_path: Path) -> None:
    """The reason for a struct walk: 150k tokens and 150k merges in well under gguf-py's seconds."""
    n = 150_000
    f = tmp_path / "vocab.gguf"
    f.write_bytes(gguf_bytes([ARCH, kv_arr("tokenizer.ggml.tokens", STR, n, b"".join(gstr(f"tok{i}") for i in range(n))),
                              kv_arr("tokenizer.ggml.merges", STR, n, b"".join(gstr(f"t o{i}") for i in range(n))),
                              kv_arr("tokenizer.ggml.token_type", 5, n, struct.pack(f"<{n}i", *([1] * n)))]))
    t0 = time.perf_counter()
    layout = read_gguf(f)
    assert time.perf_counter() - t0 < 2.0
    assert layout.array_len("tokenizer.ggml.tokens") == n and layout.kv["tokenizer.ggml.tokens"].value[:2] == ("tok0", "tok1")


# --metadata: name -> (overrides, a word the error line must carry). The first group is refused when the JSON is
# loaded; the last three need the model (its architecture, vocabulary, arrays) and are refused when the header is
# built, before any tensor is encoded.
BAD_METADATA: dict[str, tuple[dict, str]] = {
    "architecture_int": ({"general.architecture": 5}, "general.architecture"),
    "context_length_float": ({"llama.context_length": 2.5}, "UINT32"),
    "context_length_string": ({"llama.context_length": "4096"}, "UINT32"),
    "context_length_negative": ({"llama.context_length": -1}, "outside"),
    "rope_scaling_string": ({"llama.rope.scaling.factor": "2"}, "FLOAT32"),
    "name_int": ({"general.name": 7}, "STRING"),
    "nan": ({"x.y": float("nan")}, "finite"),
    "inf": ({"x.y": float("-inf")}, "finite"),
    "float_beyond_float32": ({"x.y": 1e300}, "32-bit"),
    "int_beyond_int64": ({"x.y": 2**70}, "outside"),
    "empty_array": ({"general.tags": []}, "empty array"),
    "mixed_array": ({"general.tags": ["a", 1]}, "all be strings"),
    "nested_array": ({"x.y": [[1], [2]]}, "nested"),
    "array_item_beyond_int64": ({"x.y": [1, 2**70]}, "outside"),
    "object": ({"x.y": {"a": 1}}, "no GGUF type"),
    "null": ({"x.y": None}, "no GGUF type"),
    "key_empty": ({"": "v"}, "not a GGUF key"),
    "key_with_space": ({"general name": "v"}, "not a GGUF key"),
    "key_not_ascii": ({"général.name": "v"}, "not a GGUF key"),
    "forged_provenance": ({"qrealign.realigned": True}, "forge"),
    "alignment": ({"general.alignment": 64}, "cannot be overridden"),
    "file_type": ({"general.file_type": 1}, "cannot be overridden"),
    "split_count": ({"split.count": 3}, "cannot be overridden"),
    "other_architecture": ({"general.architecture": "qwen2"}, "llama"),
    "token_id_outside_vocabulary": ({"tokenizer.ggml.bos_token_id": 10**6}, "vocabulary"),
    "vocabulary_resized": ({"tokenizer.ggml.tokens": ["a", "b"]}, "keep"),
}


@pytest.mark.parametrize("name", sorted(BAD_METADATA))
def test_convert_refuses_bad_metadata(tiny: Path, tmp_path: Path, name: str) -> None:
    overrides, match = BAD_METADATA[name]
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(overrides))  # NaN and Infinity as Python's json writes (and reads) them
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(tmp_path)
    r = run_cli(["convert", tiny, "-o", out / "o.gguf", "--outtype", "Q8_0", "--metadata", meta],
                mem_mb=CONVERT_MB, timeout=180)
    assert "metadata" in assert_refused(r, before, tmp_path, match=match)


def test_convert_refuses_duplicate_json_keys(tiny: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text('{"general.name": "a", "general.name": "b"}')  # json.loads would keep "b" silently
    before = snapshot(tmp_path)
    r = run_cli(["convert", tiny, "-o", tmp_path / "o.gguf", "--metadata", meta], mem_mb=CONVERT_MB, timeout=180)
    assert_refused(r, before, tmp_path, match="twice")


def test_good_metadata_overrides_are_written_in_the_types_llama_cpp_reads(tiny: Path, tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"general.name": "Renamed", "general.license": "apache-2.0",
                                "general.architecture": "llama", "llama.rope.freq_base": 20000,
                                "llama.context_length": 4096, "general.tags": ["edge", "safety"],
                                "tokenizer.ggml.bos_token_id": 2, "mycorp.build": 7, "general.finetune": ""}))
    out = tmp_path / "o.gguf"
    r = run_cli(["convert", tiny, "-o", out, "--outtype", "Q8_0", "--metadata", meta], mem_mb=CONVERT_MB, timeout=180)
    assert r.returncode == 0, str(r)
    assert "Duplicated key" not in r.stderr  # an override replaces the family's value in place, same type
    kv = read_gguf(out).kv
    want = {"general.name": (STR, "Renamed"), "general.license": (STR, "apache-2.0"),
            "general.architecture": (STR, "llama"), "llama.rope.freq_base": (6, 20000.0),
            "llama.context_length": (U32, 4096), "tokenizer.ggml.bos_token_id": (U32, 2), "mycorp.build": (U32, 7),
            "general.finetune": (STR, "")}  # gguf-py's add_string used to drop an empty string silently
    assert {k: (kv[k].type, kv[k].value) for k in want} == want
    assert kv["general.tags"].type == ARR and kv["general.tags"].item_type == STR
    assert kv["general.tags"].value == ("edge", "safety")
    assert kv["qrealign.pure"].value is False  # provenance still ours
