"""Hostile and broken model folders (issue 19): whatever a folder claims -- shards, tensor set, shapes, config
hparams, safetensors header fields, imatrix values -- is checked before anything is written. Each case is the
tiny llama with one claim broken, run through the real CLI: exit 2, one `error:` line, no file touched.

The cases are real files written by hand (headers with struct + json), never mocks. Positive controls show the
checks accept good models: the tiny model, a correctly sharded copy (byte-identical output), and qwen2 / gemma3
layouts built from the same weights.
"""
from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hostile import assert_refused, run_cli, snapshot
from qrealign_gguf.errors import InputError
from qrealign_gguf.hf_model import HFModel
from qrealign_gguf.imatrix import check_imatrix, save_imatrix
from tiny_models import make_tiny_llama

ST = "model.safetensors"
INDEX = "model.safetensors.index.json"
Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
NORM0 = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    d = tmp_path / "in" / "model"
    shutil.copytree(tiny, d)
    return d


# -- editing a model folder by hand ----------------------------------------------------------------------------
def read_header(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(f: Path, header_json: bytes, data: bytes) -> None:
    f.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)


def edit_header(d: Path, fn: Callable[[dict], None]) -> None:
    header, data = read_header(d / ST)
    fn(header)
    write_raw(d / ST, json.dumps(header).encode(), data)


def edit_config(d: Path, fn: Callable[[dict], None]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(d: Path, fn: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = load_file(d / ST)
    fn(tensors)
    save_file(tensors, d / ST, metadata={"format": "pt"})


def shard(d: Path, n: int = 2) -> list[str]:
    """Split model.safetensors into n shards with the index transformers writes."""
    tensors = load_file(d / ST)
    (d / ST).unlink()
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for i, f in enumerate(files):
        part = {k: tensors[k] for k in names[i::n]}
        save_file(part, d / f, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, f))
    total = sum(t.nbytes for t in tensors.values())
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return files


def edit_index(d: Path, fn: Callable[[dict], None]) -> None:
    index = json.loads((d / INDEX).read_text())
    fn(index["weight_map"])
    (d / INDEX).write_text(json.dumps(index))


def as_family(d: Path, family: str) -> None:
    """The tiny llama's weights laid out as a qwen2 (+ q/k/v biases) or gemma3 (+ ffn norms, q/k norms) model."""
    from transformers import Gemma3TextConfig, Qwen2Config

    old = json.loads((d / "config.json").read_text())
    dims = {k: old[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                                "rms_norm_eps", "tie_word_embeddings")}
    if family == "qwen2":
        cfg, arch = Qwen2Config(**dims).to_dict(), "Qwen2ForCausalLM"
        extra = {"self_attn.q_proj.bias": 64, "self_attn.k_proj.bias": 32, "self_attn.v_proj.bias": 32}
    else:
        cfg = Gemma3TextConfig(**dims, query_pre_attn_scalar=16, sliding_window=4).to_dict()
        arch = "Gemma3ForCausalLM"
        extra = {"pre_feedforward_layernorm.weight": 64, "post_feedforward_layernorm.weight": 64,
                 "self_attn.q_norm.weight": 16, "self_attn.k_norm.weight": 16}
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}))
    rng = np.random.default_rng(0)
    edit_tensors(d, lambda t: t.update({f"model.layers.{i}.{k}": rng.normal(0, 0.1, n).astype(np.float32)
                                        for i in range(dims["num_hidden_layers"]) for k, n in extra.items()}))


def _drop(name: str) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda t: t.pop(name)


def _set(name: str, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda t: t.update({name: np.full(shape, 0.01, np.float32)})


def _header_entry(name: str, **changes) -> Callable[[dict], None]:
    return lambda h: h[name].update(changes)


def _duplicate_in_header(d: Path) -> None:
    """The same tensor name twice in one header (json.loads would keep the last silently)."""
    header, data = read_header(d / ST)
    text = json.dumps(header)
    entry = json.dumps({NORM0: header[NORM0]})[1:-1]
    write_raw(d / ST, ("{" + entry + ", " + text[1:]).encode(), data)


def _overlap(h: dict) -> None:
    h[Q1]["data_offsets"] = h[Q0]["data_offsets"]  # layer 1's query would read layer 0's bytes


def _second_copy(d: Path) -> None:
    """A stray file holding a different copy of one tensor (without an index the last file read won)."""
    save_file({Q0: np.zeros((64, 64), np.float32)}, d / "zz-extra.safetensors")


# case id -> (break the folder, substring of the one error line)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # 1. shards and the index
    "shard-missing": (lambda d: (d / shard(d)[1]).unlink(), "missing"),
    "index-wrong-shard": (lambda d: (shard(d), edit_index(d, lambda m: m.update(
        {Q0: "model-00002-of-00002.safetensors" if m[Q0].startswith("model-00001") else "model-00001-of-00002.safetensors"}))),
        "puts it in"),
    "index-omits-tensor": (lambda d: (shard(d), edit_index(d, lambda m: m.pop(Q0))), "does not list it"),
    "index-lists-absent-tensor": (lambda d: (shard(d), edit_index(d, lambda m: m.update(
        {"model.layers.0.mlp.extra.weight": m[Q0]}))), "does not hold it"),
    "index-path-escape": (lambda d: (shard(d), edit_index(d, lambda m: m.update({Q0: "../model.safetensors"}))),
                          "not a .safetensors file in the model folder"),
    "shards-no-index-one-missing": (lambda d: ((d / shard(d)[0]).unlink(), (d / INDEX).unlink()), "1 of the 2 shards"),
    "duplicate-across-files": (_second_copy, "is in both"),
    # 2. the tensor set the architecture needs
    "missing-down-proj": (lambda d: edit_tensors(d, _drop("model.layers.1.mlp.down_proj.weight")),
                          "model.layers.1.mlp.down_proj.weight is missing"),
    "layer-beyond-config": (lambda d: edit_config(d, lambda c: c.update(num_hidden_layers=1)), "belongs to layer 1"),
    "bias-config-does-not-have": (lambda d: edit_tensors(d, _set("model.layers.0.self_attn.q_proj.bias", (64,))),
                                  "not part of"),
    "qwen2-without-biases": (lambda d: (as_family(d, "qwen2"), edit_tensors(d, _drop("model.layers.1.self_attn.k_proj.bias"))),
                             "model.layers.1.self_attn.k_proj.bias is missing"),
    "gemma3-without-q-norm": (lambda d: (as_family(d, "gemma3"), edit_tensors(d, _drop("model.layers.0.self_attn.q_norm.weight"))),
                              "q_norm.weight is missing"),
    # 3. shapes against config.json
    "q-proj-64x48": (lambda d: edit_tensors(d, _set(Q0, (64, 48))), "64x48"),
    "down-proj-transposed": (lambda d: edit_tensors(d, _set("model.layers.0.mlp.down_proj.weight", (128, 64))),
                             "needs 64x128"),
    "k-proj-with-query-heads": (lambda d: edit_tensors(d, _set("model.layers.1.self_attn.k_proj.weight", (64, 64))),
                                "num_key_value_heads*head_dim"),
    "norm-wrong-length": (lambda d: edit_tensors(d, _set("model.norm.weight", (65,))), "model.norm.weight"),
    "gemma3-k-norm-wrong": (lambda d: (as_family(d, "gemma3"), edit_tensors(d, _set("model.layers.1.self_attn.k_norm.weight", (64,)))),
                            "k_norm.weight has shape 64"),
    # 4. config.json hparams
    "no-num-hidden-layers": (lambda d: edit_config(d, lambda c: c.pop("num_hidden_layers")), "no num_hidden_layers"),
    "heads-zero": (lambda d: edit_config(d, lambda c: c.update(num_attention_heads=0)), "positive integer"),
    "eps-nan": (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace(
        '"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')), "rms_norm_eps"),
    "rope-theta-negative": (lambda d: edit_config(d, lambda c: c["rope_parameters"].update(rope_theta=-1.0)),
                            "rope_theta"),
    "hidden-not-divisible": (lambda d: edit_config(d, lambda c: (c.pop("head_dim"), c.update(
        num_attention_heads=5, num_key_value_heads=5))), "not a multiple"),
    "layers-1e9": (lambda d: edit_config(d, lambda c: c.update(num_hidden_layers=10**9)), "num_hidden_layers"),
    "config-is-a-list": (lambda d: (d / "config.json").write_text("[1, 2]"), "not an object"),
    # 5. safetensors headers
    "offsets-reversed": (lambda d: edit_header(d, lambda h: h[Q0].update(data_offsets=h[Q0]["data_offsets"][::-1])),
                         "reversed"),
    "offsets-overlap": (lambda d: edit_header(d, _overlap), "overlaps"),
    "offsets-not-shape-size": (lambda d: edit_header(d, _header_entry(Q0, shape=[64, 32])), "needs 8192"),
    "shape-negative": (lambda d: edit_header(d, _header_entry(NORM0, shape=[-64])), "non-negative integers"),
    "no-data-offsets": (lambda d: edit_header(d, lambda h: h[NORM0].pop("data_offsets")), "no data_offsets"),
    "entry-not-object": (lambda d: edit_header(d, lambda h: h.update({NORM0: "F32"})), "not an object"),
    "int-dtype-weight": (lambda d: edit_header(d, _header_entry(NORM0, dtype="I32")), "stored as I32"),
    "duplicate-header-name": (_duplicate_in_header, "appears twice"),
    "name-with-markup": (lambda d: edit_header(d, lambda h: h.update({"model.layers.0.x[/]": h.pop(NORM0)})),
                         "model.layers.0.x[/] is not part of"),  # quoted as is, not read as console markup
    "header-length-2^62": (lambda d: (d / ST).write_bytes(struct.pack("<Q", 2**62) + (d / ST).read_bytes()[8:]),
                           "header length"),
}
# one per kind of claim is enough to show --dry-run refuses too: it runs the same checks before printing a plan
DRY_RUN = ["shard-missing", "missing-down-proj", "q-proj-64x48", "no-num-hidden-layers", "offsets-overlap"]


@pytest.mark.parametrize("case", list(CASES))
def test_broken_model_is_refused(model, case):
    breaks, match = CASES[case]
    breaks(model)
    out = model.parent.parent / "out"
    out.mkdir()
    before = snapshot(model.parent, out)
    r = run_cli(["convert", model, "-o", out / "o.gguf", "--outtype", "Q8_0"])
    assert_refused(r, before, model.parent, out, match=match)


@pytest.mark.parametrize("case", DRY_RUN)
def test_dry_run_refuses_too(model, case):
    breaks, match = CASES[case]
    breaks(model)
    out = model.parent.parent / "out"
    out.mkdir()
    before = snapshot(model.parent, out)
    r = run_cli(["convert", model, "-o", out / "o.gguf", "--dry-run"])
    assert_refused(r, before, model.parent, out, match=match)


# -- 6. imatrix values -----------------------------------------------------------------------------------------
def test_nan_imatrix_file_is_refused(model):
    im = model.parent / "bad.imatrix.gguf"
    vec = np.ones(64, np.float32)
    vec[5] = np.nan
    save_imatrix(im, {"blk.0.attn_q.weight": vec, "blk.0.attn_k.weight": np.ones(64, np.float32)}, 100, ["x"])
    out = model.parent.parent / "out"
    out.mkdir()
    before = snapshot(model.parent, out)
    r = run_cli(["convert", model, "-o", out / "o.gguf", "--outtype", "Q4_K_M", "--imatrix", im])
    assert_refused(r, before, model.parent, out, match="blk.0.attn_q.weight")


def test_nan_weight_is_refused_before_realignment(tiny, model):
    """Realignment reads every tensor before the long work: a NaN weight must not surface after it."""
    def poison(t: dict[str, np.ndarray]) -> None:
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan

    edit_tensors(model, poison)
    out = model.parent.parent / "out"
    out.mkdir()
    before = snapshot(model.parent, out)
    r = run_cli(["convert", model, "-o", out / "o.gguf", "--outtype", "Q8_0", "--aligned", tiny, "--realign-iters", "1"])
    line = assert_refused(r, before, model.parent, out, match="NaN")
    assert "down_proj" in line


SHAPES = {"blk.0.attn_q.weight": (64, 64), "blk.0.ffn_down.weight": (64, 128), "blk.0.attn_norm.weight": (64,)}


@pytest.mark.parametrize("value, match", [(np.nan, "NaN"), (np.inf, "Inf"), (-1e-3, "negative")])
@pytest.mark.parametrize("source", ["bad.imatrix.gguf", "from --calib"])
def test_imatrix_values_checked(value, match, source):
    bad = np.ones(128, np.float32)
    bad[77] = value
    im = {"blk.0.attn_q.weight": np.ones(64, np.float32), "blk.0.ffn_down.weight": bad}
    with pytest.raises(InputError, match=match) as e:
        check_imatrix(im, SHAPES, source)
    assert "blk.0.ffn_down.weight" in str(e.value) and source in str(e.value)


def test_imatrix_all_zero_is_refused():
    # every block of the tensor would be quantized to zero (the codec weighs each weight's error by it)
    im = {"blk.0.attn_q.weight": np.ones(64, np.float32), "blk.0.ffn_down.weight": np.zeros(128, np.float32)}
    with pytest.raises(InputError, match="all zero"):
        check_imatrix(im, SHAPES, "from --calib")
    im["blk.0.ffn_down.weight"][3] = 1.0  # zero columns (dead input channels) are legitimate
    check_imatrix(im, SHAPES, "from --calib")


@pytest.mark.parametrize("count", [np.nan, -5.0, np.inf])
def test_imatrix_token_count_checked(tmp_path, count):
    """llama-imatrix's .counts is a token count: NaN, Inf or negative is a broken file, not 'no data'."""
    import gguf

    from qrealign_gguf.imatrix import load_imatrix

    path = tmp_path / "count.imatrix.gguf"
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.array([[count]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="token count"):
        load_imatrix(path)


# -- in-process checks of the header and config variants the CLI cases do not each cover ----------------------
@pytest.mark.parametrize("shape", [[64.0], [64, "64"], [True], [2**70], [1] * 9, "64"])
def test_header_shape_values(model, shape):
    edit_header(model, _header_entry(NORM0, shape=shape))
    with pytest.raises(InputError, match="shape"):
        HFModel(model)


@pytest.mark.parametrize("offsets", [[0], [0, 256, 512], [-256, 0], [0.0, 256.0], None])
def test_header_offset_values(model, offsets):
    edit_header(model, _header_entry(NORM0, data_offsets=offsets))
    with pytest.raises(InputError, match="data_offsets"):
        HFModel(model)


def test_header_gap_and_trailing_bytes(model):
    header, data = read_header(model / ST)
    write_raw(model / ST, json.dumps(header).encode(), data + b"\0" * 16)
    with pytest.raises(InputError, match="after the last tensor"):
        HFModel(model)
    for v in header.values():  # every tensor 16 bytes later: a hole at the start
        if "data_offsets" in v:
            v["data_offsets"] = [o + 16 for o in v["data_offsets"]]
    write_raw(model / ST, json.dumps(header).encode(), b"\0" * 16 + data)
    with pytest.raises(InputError, match="belong to no tensor"):
        HFModel(model)


def test_header_nested_too_deep(model):
    write_raw(model / ST, b"[" * 100_000 + b"]" * 100_000, b"")
    with pytest.raises(InputError, match="not a valid safetensors"):
        HFModel(model)


@pytest.mark.parametrize("key, value", [("num_attention_heads", -4), ("num_attention_heads", 4.5),
                                        ("num_attention_heads", "4"),
                                        ("num_attention_heads", True), ("hidden_size", None),
                                        ("vocab_size", 2**40), ("num_key_value_heads", 3),
                                        ("max_position_embeddings", 0), ("rms_norm_eps", -1e-5),
                                        ("rms_norm_eps", "1e-5"), ("head_dim", 15)])
def test_config_values(model, key, value):
    from qrealign_gguf.models import family_for

    edit_config(model, lambda c: c.update({key: value}))
    with pytest.raises(InputError, match=key if key != "head_dim" else "even") as e:
        family_for(HFModel(model)).validate()
    assert "\n" not in str(e.value)


def test_names_from_the_file_stay_on_one_line(model):
    from qrealign_gguf.models import family_for

    edit_header(model, lambda h: h.update({"model.layers.0.evil\nerror: fake second line": h.pop(NORM0)}))
    with pytest.raises(InputError, match="not part of") as e:
        family_for(HFModel(model)).validate()
    assert "\n" not in str(e.value)
    edit_config(model, lambda c: c.update(architectures="LlamaForCausalLM"))  # a string, not a list
    with pytest.raises(InputError, match="list of class names"):
        family_for(HFModel(model))


# -- positive controls: good models still convert ---------------------------------------------------------------
def test_good_model_converts(model):
    out = model.parent.parent / "out"
    out.mkdir()
    r = run_cli(["convert", model, "-o", out / "o.gguf", "--outtype", "Q8_0"])
    assert r.returncode == 0, str(r)
    assert (out / "o.gguf").read_bytes()[:4] == b"GGUF"
    # the same weights sharded with an index (and a stray consolidated file the index does not name) give the
    # same bytes: the index is what is read
    sharded = model.parent.parent / "sharded" / "model"
    shutil.copytree(model, sharded)
    shard(sharded, 3)
    (sharded / "consolidated.safetensors").write_bytes(b"not part of the model")
    r = run_cli(["convert", sharded, "-o", out / "s.gguf", "--outtype", "Q8_0"])
    assert r.returncode == 0, str(r)
    assert (out / "s.gguf").read_bytes() == (out / "o.gguf").read_bytes()


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_other_family_layouts_plan(model, family):
    as_family(model, family)
    r = run_cli(["convert", model, "-o", model.parent / "o.gguf", "--dry-run"])
    assert r.returncode == 0, str(r)
    assert f"{family} -> o.gguf" in r.stdout
