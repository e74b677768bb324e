"""realign/equalize.py: the exact-equivalence transforms (norm -> q/k/v, v -> o, norm -> gate/up, up -> down) and
the per-group scale search, on tiny in-memory Qwen2 models (q/k/v biases, GQA)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qrealign_gguf.formats import codec
from qrealign_gguf.formats.types import qtype
from qrealign_gguf.realign import equalize as eq

Q4K = qtype("Q4_K")


def tiny_qwen2(hidden: int = 256, inter: int = 512, heads: int = 4, kv: int = 2, seed: int = 0,
               outlier_channels: int = 0):  # noqa: ANN201
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=300, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
        layer = m.model.layers[0]
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        if outlier_channels:  # a few large activation channels, as in real LLMs (what AWQ-style scaling is for)
            layer.input_layernorm.weight[:outlier_channels] *= 25
            layer.post_attention_layernorm.weight[:outlier_channels] *= 25
    return m


def ids(n: int = 3, t: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def test_fold_is_exact_in_float64() -> None:
    m = tiny_qwen2().double()
    x = ids()
    with torch.no_grad():
        want = m(x).logits
    rng = np.random.default_rng(0)
    s = eq.Scales(attn=rng.uniform(0.3, 3, 256).astype(np.float32), vo=rng.uniform(0.3, 3, 128).astype(np.float32),
                  ffn=rng.uniform(0.3, 3, 256).astype(np.float32), ud=rng.uniform(0.3, 3, 512).astype(np.float32))
    layer = m.model.layers[0]
    before = {n: p.clone() for n, p in layer.named_parameters()}
    eq.fold(layer, s, n_heads=4, n_kv=2)
    with torch.no_grad():
        got = m(x).logits
    assert all(not torch.equal(before[n], p) for n, p in layer.named_parameters()
               if not n.endswith(("q_proj.bias", "k_proj.bias")))  # every scaled tensor really changed
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_o_columns_follow_gqa_sharing() -> None:
    vo = np.arange(6, dtype=np.float32)  # 2 kv heads x head_dim 3
    # 4 q heads: heads 0,1 read kv head 0, heads 2,3 read kv head 1
    assert eq.o_columns(vo, n_heads=4, n_kv=2).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]


def test_channel_scales() -> None:
    m = np.array([0.0, 1.0, 4.0, 16.0], dtype=np.float32)
    assert np.array_equal(eq.channel_scales(m, 0.0), np.ones(4, dtype=np.float32))
    s = eq.channel_scales(m, 0.5)
    assert abs(np.log(s.astype(np.float64)).mean()) < 1e-6 and np.all(np.diff(s) > 0) and np.isfinite(s).all()


def test_group_error_is_the_output_error_on_the_tokens() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.05, (6, 256)).astype(np.float32)
    x = rng.normal(0, 1, (50, 256)) * np.where(np.arange(256) < 4, 20.0, 1.0)
    s = eq.channel_scales(np.abs(x).mean(0), 0.5)
    enc = eq.rtn_encoder([Q4K], [None])
    got = eq.group_error([w], x.T @ x, s, enc)
    ws = w * s
    deq = codec.dequantize(codec.quantize(ws, Q4K), Q4K, 256)
    want = float((((deq - ws) @ (x / s).T) ** 2).sum())
    assert got == pytest.approx(want, rel=1e-6)


def test_choose_reduces_error_on_outlier_channels_and_never_increases_it() -> None:
    m = tiny_qwen2(outlier_channels=4)
    layer = m.model.layers[0]
    x = ids()
    encoders = {n: (Q4K, None) for n in eq.LINEARS}
    scales, reports = eq.choose(layer, lambda: m(x), encoders, n_heads=4, n_kv=2)
    by = {r.name: r for r in reports}
    assert set(by) == {"attn_norm->qkv", "v->o", "ffn_norm->gate/up", "up->down"}
    assert all(r.error_after <= r.error_before for r in reports)
    # the planted outliers are exactly what the norm -> q/k/v scaling is for
    assert by["attn_norm->qkv"].alpha_used and by["attn_norm->qkv"].error_after < 0.8 * by["attn_norm->qkv"].error_before
    assert scales.attn[:4].min() > scales.attn[4:].max()


@pytest.mark.parametrize("missing", ["self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"])
def test_choose_keeps_identity_for_groups_touching_an_unencoded_linear(missing: str) -> None:
    """A linear written unscaled (not block-encoded) pins every group it consumes from or produces for: k (a
    consumer of attn_norm), v (consumer of attn_norm, producer for o), up (consumer of ffn_norm, producer for down),
    down (consumer of up). The other groups still search."""
    m = tiny_qwen2(outlier_channels=4)
    x = ids()
    encoders = {n: (Q4K, None) for n in eq.LINEARS if n != missing}
    scales, reports = eq.choose(m.model.layers[0], lambda: m(x), encoders, n_heads=4, n_kv=2)
    pinned = {"self_attn.k_proj": {"attn"}, "self_attn.v_proj": {"attn", "vo"}, "mlp.up_proj": {"ffn", "ud"},
              "mlp.down_proj": {"ud"}}[missing]
    for g in ("attn", "vo", "ffn", "ud"):
        s = getattr(scales, g)
        assert np.all(s == 1) == (g in pinned), (g, s[:4])
    assert len(reports) == 4 - len(pinned)


def test_imatrix_moves_with_the_scale() -> None:
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.05, (4, 256)).astype(np.float32)
    im = rng.uniform(0.5, 2, 256).astype(np.float32)
    s = rng.uniform(0.5, 2, 256).astype(np.float32)
    got = eq.rtn_encoder([Q4K], [im])(0, w * s, s)
    want = codec.dequantize(codec.quantize(w * s, Q4K, imatrix=(im / s.astype(np.float64) ** 2).astype(np.float32)), Q4K, 256)
    assert np.array_equal(got, want)


def test_supported_refuses_other_layer_shapes() -> None:
    layer = tiny_qwen2().model.layers[0]
    assert eq.supported(layer) is None
    del layer.mlp.up_proj
    assert "mlp.up_proj" in eq.supported(layer)


def test_cli_refuses_equalize_for_gemma(tmp_path) -> None:
    """Gemma stores norms as 1 + w: refused in one line before any work (and no output file)."""
    from typer.testing import CliRunner

    from qrealign_gguf.cli import app
    from test_families import build_case

    d, _, _ = build_case("gemma2-spm", tmp_path / "g")
    out = tmp_path / "o.gguf"
    r = CliRunner().invoke(app, ["convert", str(d), "-o", str(out), "--outtype", "Q4_0", "--probes",
                                 str(tmp_path / "p.safetensors"), "--equalize"])
    lines = r.output.strip().splitlines()
    assert r.exit_code != 0 and len(lines) == 1 and "--equalize supports llama, qwen2" in lines[0], r.output
    assert not out.exists()


# ---- wired into the realignment (tiny llama on disk, llama.cpp runs the file) ---------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):  # noqa: ANN201
    from tiny_models import make_tiny_llama, planted_probes

    d = make_tiny_llama(tmp_path_factory.mktemp("eq") / "hf", hidden=64, inter=128, layers=2)
    return d, planted_probes(d, 8, target_benign=0.0)


def _run(tiny_llama, tmp_path, outtype: str, equalize: bool, iters: int = 0, ckpt: str = "ckpt", report=None):  # noqa: ANN001, ANN202
    from qrealign_gguf.plan import make_plan
    from qrealign_gguf.realign.calibrate import RealignSettings
    from qrealign_gguf.realign.pipeline import realign_model

    d, probes = tiny_llama
    plan = make_plan(d, tmp_path / "o.gguf", outtype)
    s = RealignSettings(iters=iters, harm_weight=1.0 if iters else 0.0, n_benign=8, n_harmful=8, batch=4,
                        equalize=equalize)
    return realign_model(d, plan, probes, s, checkpoint_dir=tmp_path / ckpt, report=report)


def test_equalized_file_computes_the_same_model(tiny_llama, tmp_path) -> None:
    """iters 0 = equalize + plain encoding. In Q8_0 (little quantization noise) llama.cpp's logits of the
    equalized file match the plain file's: the rescaled norms/biases were written along with the weights."""
    from qrealign_gguf.convert import ConvertOptions, convert
    from qrealign_gguf.gguf_read import GGUFReader
    from qrealign_gguf.llamacpp import logits

    d, _ = tiny_llama
    packed = _run(tiny_llama, tmp_path, "Q8_0", equalize=True)
    assert {"blk.0.attn_norm.weight", "blk.1.ffn_norm.weight"} <= set(packed)
    plain, eqd = tmp_path / "plain.gguf", tmp_path / "eq.gguf"
    convert(d, plain, ConvertOptions(outtype="Q8_0"))
    convert(d, eqd, ConvertOptions(outtype="Q8_0", packed=packed))
    norms = {t.name: np.asarray(t.data) for t in GGUFReader(eqd).tensors if t.name.endswith("norm.weight")}
    src = {t.name: np.asarray(t.data) for t in GGUFReader(plain).tensors if t.name.endswith("norm.weight")}
    assert not np.array_equal(norms["blk.0.attn_norm.weight"], src["blk.0.attn_norm.weight"])
    toks = list(range(10, 60))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(torch.tensor([toks])).logits[0]
    k_plain, k_eq = _kld(ref, logits(plain, toks)), _kld(ref, logits(eqd, toks))
    # measured: 3.1e-5 plain, 3.7e-5 equalized; the same file without its rescaled norms: 4.2e-4
    assert k_eq < 2 * k_plain + 1e-6, (k_plain, k_eq)


def _kld(ref: torch.Tensor, got: np.ndarray) -> float:
    p = torch.log_softmax(ref.double(), -1)
    q = torch.log_softmax(torch.from_numpy(got).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_resume_with_equalize_gives_the_same_bytes(tiny_llama, tmp_path) -> None:
    full = _run(tiny_llama, tmp_path, "Q4_0", equalize=True, iters=4, ckpt="a")

    def crash(i, n, s, resumed):  # noqa: ANN001, ANN202
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_llama, tmp_path, "Q4_0", equalize=True, iters=4, ckpt="b", report=crash)
    again = _run(tiny_llama, tmp_path, "Q4_0", equalize=True, iters=4, ckpt="b")
    assert full.keys() == again.keys()
    for k in full:
        assert np.array_equal(full[k], again[k]), k


# ---- linears the plan does not block-encode (F16 fallback) ------------------------------------------------------

def _file_model_logits(hf_dir, gguf, tokens: list[int]) -> np.ndarray:  # noqa: ANN001
    """The float model the file stores: an HF float32 pass with EVERY tensor taken from the file (quantized ones
    decoded by our codec, F16/F32 ones as written: norms, fallback linears)."""
    from transformers import AutoModelForCausalLM

    from qrealign_gguf.formats.types import qtype as qt
    from qrealign_gguf.gguf_read import GGUFReader
    from qrealign_gguf.hf_model import HFModel
    from qrealign_gguf.models import family_for
    from test_custom_llama import _unpermute

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    fam = family_for(HFModel(hf_dir))
    hf_name = {s.name: s.hf_name for s in fam.tensors()}
    sd = model.state_dict()
    with torch.no_grad():
        for t in GGUFReader(gguf).tensors:
            target = sd[hf_name[t.name]]
            cols = int(t.shape[0])
            raw = np.asarray(t.data)
            if t.tensor_type.name in ("F32", "F16"):
                w = raw.astype(np.float32).reshape(-1, cols)
            else:
                w = codec.dequantize(raw.reshape(int(np.prod(t.shape[1:])), -1), qt(t.tensor_type.name), cols)
            if ".attn_q." in t.name:
                w = _unpermute(w, fam.n_head)
            elif ".attn_k." in t.name:
                w = _unpermute(w, fam.n_head_kv)
            target.copy_(torch.from_numpy(w.reshape(target.shape)))
        return model(torch.tensor([tokens])).logits[0].double().numpy()


@pytest.mark.parametrize("hidden,inter", [(64, 40), (48, 128)], ids=["down-F16", "qkv-o-gate-up-F16"])
def test_equalize_skips_groups_with_unencoded_linears(tmp_path, hidden: int, inter: int) -> None:
    """Rows that are no multiple of 32 make the plan write those linears as F16 (straight from the source), so
    equalization must leave their scaling groups alone: a scaled norm next to an unscaled F16 consumer (or an F16
    producer next to a scaled consumer) is a different model. The file's float model must stay the source's."""
    from qrealign_gguf.convert import ConvertOptions, convert
    from qrealign_gguf.plan import make_plan
    from tiny_models import make_tiny_llama, planted_probes

    d = make_tiny_llama(tmp_path / "hf", hidden=hidden, inter=inter, layers=2, heads=4, kv_heads=2)
    plan = make_plan(d, tmp_path / "o.gguf", "Q8_0")
    f16 = {t.source.name.split(".", 2)[2] for t in plan.tensors if t.qtype.name == "F16" and t.source.name.startswith("blk.0.")}
    assert f16 == ({"ffn_down.weight"} if inter == 40 else
                   {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
                    "ffn_up.weight"}), f16  # the shapes really exercise the fallback
    packed = _run((d, planted_probes(d, 8, target_benign=0.0)), tmp_path, "Q8_0", equalize=True)
    plain, eqd = tmp_path / "plain.gguf", tmp_path / "eq.gguf"
    convert(d, plain, ConvertOptions(outtype="Q8_0"))
    convert(d, eqd, ConvertOptions(outtype="Q8_0", packed=packed))
    toks = list(range(10, 60))
    ref = _file_model_logits(d, plain, toks)  # the plain Q8_0 file's float model
    with torch.no_grad():
        from transformers import AutoModelForCausalLM
        src = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(torch.tensor([toks])).logits[0]
    k_plain = _kld(src, ref)
    k_eq = _kld(src, _file_model_logits(d, eqd, toks))
    assert k_eq < 2 * k_plain + 1e-6, (k_plain, k_eq)
