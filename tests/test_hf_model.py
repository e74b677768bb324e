"""Lazy safetensors reading: exact values for every float dtype, shards, and header validation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qrealign_gguf.errors import InputError
from qrealign_gguf.hf_model import HFModel


def _model(tmp_path, tensors: dict[str, torch.Tensor], shards: int = 1):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    names = list(tensors)
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, tmp_path / f"model-{i:05d}-of-{shards:05d}.safetensors")
    return HFModel(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_load_is_exact(tmp_path, dtype):
    x = (torch.randn(7, 33) * 3).to(dtype)
    m = _model(tmp_path, {"w": x, "v": torch.randn(5).to(dtype)})
    got = m.load("w")
    assert got.dtype == np.float32 and got.shape == (7, 33)
    assert np.array_equal(got, x.float().numpy())


def test_shards(tmp_path):
    ts = {f"t{i}": torch.randn(3, 4) for i in range(5)}
    m = _model(tmp_path, ts, shards=2)
    assert sorted(m.tensor_names()) == sorted(ts)
    for n, t in ts.items():
        assert np.array_equal(m.load(n), t.numpy())


def test_header_claims_more_than_file(tmp_path):
    _model(tmp_path, {"w": torch.randn(64, 64)})
    f = next(tmp_path.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated"):
        HFModel(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        HFModel(tmp_path / "missing")


def test_bin_checkpoint_hint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="safe_serialization"):
        HFModel(tmp_path)
