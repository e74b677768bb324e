"""Per-tensor type choice: ours must equal llama-quantize's on the same model (the pinned binary is the oracle)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import gguf
import pytest

from qrealign_gguf.convert import ConvertOptions, convert
from qrealign_gguf.plan import PlanInput, make_plan, plan_types, resolve_outtype
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


# ---- widths whose rows are no multiple of 256: llama-quantize's fallback types -----------------------------------

K_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
# (hidden, intermediate, heads, kv heads): 576 = SmolLM2 (ffn_down rows 1536 = 6 * 256 keep K types), 640 and 896
# with intermediates of 128 * odd (every row falls back); Q/K/V, O, gate/up, token_embd and output rows all have
# the hidden width. 4 layers: use_more_bits picks layers 0, 2, 3.
WIDTHS = {576: (1536, 9, 3), 640: (1664, 10, 2), 896: (1152, 14, 2)}


@pytest.fixture(scope="module", params=sorted(WIDTHS), ids=lambda w: f"hidden{w}")
def f16_model(request, tmp_path_factory, llama):  # noqa: ARG001 - llama: fail early without the build
    hidden = request.param
    inter, heads, kv = WIDTHS[hidden]
    d = make_tiny_llama(tmp_path_factory.mktemp(f"w{hidden}") / "hf", hidden=hidden, inter=inter, layers=4,
                        heads=heads, kv_heads=kv, tie=False)
    f16 = d.parent / "m-f16.gguf"
    convert(d, f16, ConvertOptions(outtype="F16"))
    return d, f16


# `llama-quantize --dry-run` runs llama.cpp's own per-tensor type choice and prints it without quantizing (0.1 s
# instead of seconds per mix); one line per tensor, "[ 9/ 21] blk.0.ffn_down.weight - [...], type = f16, size =
# 1.69 MiB -> 0.47 MiB (q4_K)", without the "(type)" for tensors it keeps (the norms). Checked against real runs:
# the same types as the written files (and test_mix_matches_llama_quantize above compares written files).
_DRY_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*?\], type =\s+(\w+), size =.*?(?:\((\w+)\))?\s*$")


def _dry_run_types(llama, f16: Path, mix: str) -> dict[str, str]:  # noqa: ANN001 - LlamaBuild
    r = subprocess.run([str(llama.bin("llama-quantize")), "--dry-run", str(f16), mix], env=llama.env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    types = {m[1]: (m[3] or m[2]).upper() for m in map(_DRY_LINE.match, (r.stdout + r.stderr).splitlines()) if m}
    assert len(types) == len(gguf.GGUFReader(f16).tensors), "llama-quantize's dry-run output changed format"
    return types


@pytest.mark.parametrize("mix", K_MIXES)
def test_fallback_mix_matches_llama_quantize(mix, f16_model, llama, tmp_path):
    """Our per-tensor types (the plan convert writes) equal the pinned llama-quantize's on the same F16 GGUF."""
    hf, f16 = f16_model
    theirs = _dry_run_types(llama, f16, mix)
    assert any(t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") for t in theirs.values()), theirs  # a fallback happened
    plan = make_plan(hf, tmp_path / "ours.gguf", mix)
    ours = {t.source.name: t.qtype.name for t in plan.tensors}
    diff = {k: (ours.get(k), theirs.get(k)) for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    assert not diff, diff  # name: (ours, llama-quantize's)
