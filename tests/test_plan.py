"""Per-tensor type choice: ours must equal llama-quantize's on the same model (the pinned binary is the oracle)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import pytest

from qrealign_gguf.convert import ConvertOptions, convert
from qrealign_gguf.plan import PlanInput, plan_types, resolve_outtype
from tiny_models import make_tiny_llama

MIXES = ["Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory, llama):
    # 8 layers so the use_more_bits pattern matters; hidden 256 so K-quants apply; untied output.
    d = make_tiny_llama(tmp_path_factory.mktemp("m") / "hf", hidden=256, inter=512, layers=8, heads=4,
                        kv_heads=1, tie=False)
    f32 = d.parent / "m-f32.gguf"
    convert(d, f32, ConvertOptions(outtype="F32"))
    return d, f32


@pytest.mark.parametrize("mix", MIXES)
def test_mix_matches_llama_quantize(mix, f32_model, llama, tmp_path):
    hf, f32 = f32_model
    ref = tmp_path / "ref.gguf"
    subprocess.run([str(llama.bin("llama-quantize")), str(f32), str(ref), mix], check=True, env=llama.env(),
                   capture_output=True)
    ours = tmp_path / "ours.gguf"
    convert(hf, ours, ConvertOptions(outtype=mix))
    assert _types(ours) == _types(ref)


def test_fallback_rows_not_multiple_of_256():
    # 576-wide rows (SmolLM2) cannot hold 256-blocks: llama.cpp demotes Q4_K->Q5_0, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0
    ts = [PlanInput("token_embd.weight", (1000, 576)), PlanInput("blk.0.attn_q.weight", (576, 576)),
          PlanInput("blk.0.ffn_down.weight", (576, 1536)), PlanInput("blk.0.attn_norm.weight", (576,))]
    plan = {k: v.name for k, v in plan_types("Q4_K_M", ts, n_layer=1, n_head=9, n_head_kv=3).items()}
    assert plan == {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q5_0",
                    "blk.0.ffn_down.weight": "Q6_K", "blk.0.attn_norm.weight": "F32"}
    q2 = {k: v.name for k, v in plan_types("Q2_K", ts, n_layer=1, n_head=9, n_head_kv=3).items()}
    assert q2["blk.0.attn_q.weight"] == "Q4_0"


def test_aliases_and_bad_outtype():
    assert resolve_outtype("q4_k") == "Q4_K_M"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_outtype("Q7_X")
