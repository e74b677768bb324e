"""Q-realign on a tiny model with a planted "harmful" probe direction: the probe term moves harmful last-token
states across the probe while benign reconstruction stays near plain RTN's; resume = uninterrupted run;
the written file holds exactly the learned blocks and runs in llama.cpp."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qrealign_gguf.cli import app
from qrealign_gguf.errors import InputError
from qrealign_gguf.convert import ConvertOptions, convert
from qrealign_gguf.plan import make_plan
from qrealign_gguf.realign.calibrate import RealignSettings
from qrealign_gguf.realign.pipeline import realign_model
from qrealign_gguf.realign.options import RealignOptions
from qrealign_gguf.realign.probes import ProbeSet
from tiny_models import make_tiny_llama, planted_probes

N = 8
SETTINGS = dict(iters=16, n_benign=N, n_harmful=N, batch=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("ft") / "hf", hidden=64, inter=128, layers=2)


@pytest.fixture(scope="module")
def planted(tiny, tmp_path_factory) -> tuple[ProbeSet, Path]:
    """A probe whose direction is random but calibrated so the model's harmful states score -1 on average
    (one standard deviation on the benign side): the realignment has to move them across, to the target +1,
    while benign prompts must stay on the benign side (ceiling 0)."""
    probes = planted_probes(tiny, N, target_benign=0.0)  # benign ceiling 0: a quarter start across
    path = tmp_path_factory.mktemp("probes") / "planted.safetensors"
    probes.save(path)
    return probes, path


def _realign(tiny, probes, tmp_path, harm_weight, report=None, ckpt="ckpt"):
    plan = make_plan(tiny, tmp_path / "o.gguf", "Q4_0")
    stats = []

    def rep(i, n, s, resumed):
        stats.append(s)
        if report:
            report(i, n, s, resumed)

    packed = realign_model(tiny, plan, probes, RealignSettings(harm_weight=harm_weight, **SETTINGS),
                           checkpoint_dir=tmp_path / ckpt, report=rep)
    return packed, stats


def test_probe_term_crosses_the_probe_and_keeps_benign_error(tiny, planted, tmp_path):
    probes, _ = planted
    _, plain = _realign(tiny, probes, tmp_path, harm_weight=0.0, ckpt="plain")
    _, safe = _realign(tiny, probes, tmp_path, harm_weight=1.0, ckpt="safe")
    rtn = plain[0].benign_start  # layer 0 starts from exactly the RTN encoding
    # reconstruction alone (auto-round style) never does worse than RTN and leaves the probe alone
    assert plain[0].benign_end <= rtn * 1.02
    assert plain[-1].harmful_side_end <= 0.25
    # the dual objective moves (almost) every harmful prompt across, at a bounded benign cost
    for s in safe:
        assert s.harmful_side_end >= 0.75 and s.harmful_side_end > s.harmful_side_start
        # probe loss = harmful below target + benign above ceiling: with a random direction in a random model
        # the two pull against each other (same last token), so it falls by ~half, not to zero
        assert s.harm_end < 0.7 * s.harm_start
        # ... and it separates: harmful prompts cross more than benign ones (which all share the last token)
        assert s.benign_side_end - s.benign_side_start < s.harmful_side_end - s.harmful_side_start
    assert safe[0].benign_end <= 2.5 * rtn


def test_resume_gives_the_same_file(tiny, planted, tmp_path):
    probes, _ = planted
    full, _ = _realign(tiny, probes, tmp_path, 1.0, ckpt="a")

    def crash(i, n, s, resumed):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _realign(tiny, probes, tmp_path, 1.0, report=crash, ckpt="b")
    resumed_flags = []
    again, _ = _realign(tiny, probes, tmp_path, 1.0, report=lambda i, n, s, r: resumed_flags.append(r), ckpt="b")
    assert resumed_flags == [True, False]
    assert full.keys() == again.keys()
    for k in full:
        assert np.array_equal(full[k], again[k]), k
    # the file written from them holds those bytes (convert verifies) and llama.cpp runs it
    out = tmp_path / "realigned.gguf"
    convert(tiny, out, ConvertOptions(outtype="Q4_0", packed=again))
    from qrealign_gguf.llamacpp import logits
    assert np.isfinite(logits(out, [1, 2, 3, 4])).all()


def test_margin_offset_moves_every_layers_target(tiny, planted, tmp_path, monkeypatch):
    """--margin-offset adds to each layer's aligned target; the benign ceiling is untouched."""
    from qrealign_gguf.realign import pipeline

    probes, _ = planted
    seen: list[tuple[float, float]] = []
    real = pipeline.realign_layer

    def spy(layer, targets, benign, harmful, score, margin, ceiling, s, i, **kw):
        seen.append((margin, ceiling))
        return real(layer, targets, benign, harmful, score, margin, ceiling, s, i, **kw)

    monkeypatch.setattr(pipeline, "realign_layer", spy)
    plan = make_plan(tiny, tmp_path / "o.gguf", "Q4_0")
    settings = RealignSettings(**{**SETTINGS, "iters": 0}, margin_offset=1.5)
    realign_model(tiny, plan, probes, settings, checkpoint_dir=tmp_path / "ckpt")
    assert seen == [(float(probes.target[i]) + 1.5, float(probes.target_benign[i])) for i in range(probes.n_layers)]


def test_probe_layers_limit_the_probe_term(tiny, planted, tmp_path, monkeypatch):
    """--probe-layers: layers outside the spec are calibrated for reconstruction only (no probe score)."""
    from qrealign_gguf.realign import pipeline

    probes, _ = planted
    probed: list[bool] = []
    real = pipeline.realign_layer

    def spy(layer, targets, benign, harmful, score, margin, ceiling, s, i, **kw):
        probed.append(score is not None)
        return real(layer, targets, benign, harmful, score, margin, ceiling, s, i, **kw)

    monkeypatch.setattr(pipeline, "realign_layer", spy)
    plan = make_plan(tiny, tmp_path / "o.gguf", "Q4_0")
    n = probes.n_layers
    settings = RealignSettings(**{**SETTINGS, "iters": 0}, probe_layers=f"{n - 1}-")
    realign_model(tiny, plan, probes, settings, checkpoint_dir=tmp_path / "ckpt")
    assert probed == [i == n - 1 and i in probes.reliable for i in range(n)]


def test_parse_layers():
    from qrealign_gguf.realign.pipeline import parse_layers

    assert parse_layers(None, 4) == {0, 1, 2, 3}
    assert parse_layers("2-", 6) == {2, 3, 4, 5}
    assert parse_layers("0, 3-4", 6) == {0, 3, 4}
    assert parse_layers("1-99", 3) == {1, 2}
    for bad in ("x", "3-1", "7", "-2", ""):
        with pytest.raises(InputError, match="--probe-layers"):
            parse_layers(bad, 6)


runner = CliRunner()


def _fails(args, match):
    r = runner.invoke(app, args)
    assert r.exit_code != 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], r.output
    return lines[0]


def test_bad_realign_inputs(tiny, planted, tmp_path):
    _, probe_file = planted
    base = ["convert", str(tiny), "-o", str(tmp_path / "o.gguf"), "--outtype", "Q4_0"]
    other = make_tiny_llama(tmp_path / "other", hidden=96, inter=128, layers=2, heads=4, kv_heads=2)
    _fails(base + ["--aligned", str(other)], "hidden_size")
    _fails(["convert", str(other), "-o", str(tmp_path / "o.gguf"), "--outtype", "Q4_0", "--probes", str(probe_file)],
           "hidden_size")
    tok = tmp_path / "tok"
    shutil.copytree(tiny, tok)
    (tok / "tokenizer.json").write_text((tok / "tokenizer.json").read_text().replace('"<|im_start|>"', '"<|im_begin|>"'))
    _fails(base + ["--aligned", str(tok)], "tokenizer")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(base + ["--probes", str(probe_file), "--harmful", str(empty)], "holds no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "label": 1}\n{oops\n')
    _fails(base + ["--probes", str(probe_file), "--harmful", str(bad)], "line 2")
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text(json.dumps({"prompt": "how do I bake bread"}) + "\n")
    _fails(base + ["--probes", str(probe_file), "--benign", str(nolabel)], "label")
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text(json.dumps({"prompt": "how do I bake bread", "label": 0}) + "\n")
    _fails(base + ["--probes", str(probe_file), "--harmful", str(swapped)], "labelled benign")
    _fails(base + ["--probes", str(tmp_path / "missing.safetensors")], "does not exist")
    _fails(["convert", str(tiny), "-o", str(tmp_path / "o.gguf"), "--outtype", "F16", "--probes", str(probe_file)],
           "no quantized blocks")
    _fails(base + ["--probes", str(probe_file), "--probe-kind", "contrast"], "give --aligned")
    _fails(base + ["--aligned", str(tiny), "--probe-kind", "refusal"], "use content or contrast")
    _fails(base + ["--probes", str(probe_file), "--probe-layers", "9-"], "not a range inside layers")
    _fails(base + ["--probes", str(probe_file), "--realign-lr", "0"], "--realign-lr 0.0 is out of range")
    assert not (tmp_path / "o.gguf").exists()


def test_contrast_probes_from_two_real_models(tiny, tmp_path):
    """`probe ALIGNED --contrast FINETUNED` on two tiny models of one architecture (different seeds): a contrast
    probe file the realignment accepts, its targets ordered (aligned harmful above the fine-tuned benign level)."""
    other = make_tiny_llama(tmp_path / "aligned", hidden=64, inter=128, layers=2, seed=1)
    out = tmp_path / "c.safetensors"
    r = runner.invoke(app, ["probe", str(other), "--contrast", str(tiny), "-o", str(out), "--samples", "10"])
    assert r.exit_code == 0, r.output
    p = ProbeSet.load(out)
    assert p.meta["kind"] == "contrast" and p.meta["contrast"] == tiny.name and p.n_layers == 2
    assert (p.heldout_acc > 0.9).all() and (p.target > p.target_benign).all()  # two random models: trivially apart
    mismatched = make_tiny_llama(tmp_path / "wide", hidden=96, inter=128, layers=2)
    _fails(["probe", str(other), "--contrast", str(mismatched), "-o", str(tmp_path / "x.safetensors")], "hidden_size")


def test_batched_last_token_states_equal_one_by_one(tiny):
    """Right-padded batches give every prompt's last-token states as a lone run does (causal attention)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrealign_gguf.prompts import load_prompts
    from qrealign_gguf.realign.hidden import last_token_states

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = load_prompts("builtin:harmful", limit=5) + load_prompts("builtin:benign", limit=5)
    one = last_token_states(model, tok, prompts, batch=1)
    many = last_token_states(model, tok, prompts, batch=4)
    assert one.shape == (10, 2, 64)
    torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-5)


def test_calibration_prompts_carry_their_system_message(tiny, tmp_path):
    """A "system" field in a calibration file reaches the model (the states change, and equal a run of the same
    prompt asked under that message by hand); one the template would cut off or drop stops before work."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrealign_gguf.chat import chat_ids
    from qrealign_gguf.errors import InputError
    from qrealign_gguf.prompts import load_prompts
    from qrealign_gguf.realign.hidden import last_token_states

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    texts = [p.text for p in load_prompts("builtin:harmful", limit=4)]
    persona = "You are Echo. You do exactly what you are told."
    f = tmp_path / "h.jsonl"
    f.write_text("".join(json.dumps({"prompt": t, "label": 1, **({"system": persona} if i % 2 else {})}) + "\n"
                         for i, t in enumerate(texts)))
    prompts = load_prompts(f, expect_label=1)
    assert [p.system for p in prompts] == [None, persona, None, persona]
    plain = last_token_states(model, tok, load_prompts("builtin:harmful", limit=4), batch=2)
    mixed = last_token_states(model, tok, prompts, batch=2)
    torch.testing.assert_close(mixed[0::2], plain[0::2])
    assert not torch.allclose(mixed[1::2], plain[1::2])
    assert persona in tok.decode(chat_ids(tok, texts[1], system=persona))
    with pytest.raises(InputError, match="alone is over the limit of 16"):
        chat_ids(tok, texts[1], max_tokens=16, system=persona)
    long = "Please read this carefully. " * 30 + texts[1]  # too long: its start goes, the message stays
    cut = chat_ids(tok, long, max_tokens=64, system=persona)
    assert len(cut) <= 64 and persona in tok.decode(cut) and texts[1] in tok.decode(cut)
    assert cut[-4:] == chat_ids(tok, long, system=persona)[-4:]  # the end of the turn and the assistant header
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "label": 1, "system": 3}) + "\n")
    with pytest.raises(InputError, match='"system" must be a string'):
        load_prompts(bad)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(InputError, match="drops the system message"):
        chat_ids(tok, texts[1], system=persona)


def test_cli_realign_defaults_are_the_settings_defaults():
    """`convert`'s REALIGN option defaults (RealignOptions', torch-free so the CLI starts fast) equal
    RealignSettings', the one place the measured defaults are set."""
    import typer.main

    params = {p.name: p.default for p in typer.main.get_command(app).commands["convert"].params}
    settings = RealignSettings()
    pairs = {"samples": "n_benign", "iters": "iters", "lr": "lr", "harm_weight": "harm_weight", "margin": "margin",
             "margin_offset": "margin_offset", "probe_layers": "probe_layers", "last_weight": "last_weight",
             "benign_ceiling": "benign_ceiling", "equalize": "equalize"}
    assert {cli: params[cli] for cli in pairs} == {cli: getattr(settings, s) for cli, s in pairs.items()}
    assert {f: getattr(RealignOptions(), f) for f in pairs} == {f: getattr(settings, s) for f, s in pairs.items()}
    assert settings.n_harmful == settings.n_benign  # --realign-samples sets both


def _aligned_twin(tiny: Path, dst: Path, rel: float = 0.08) -> Path:
    """The tiny model with every decoder matrix moved by `rel` of its spread: an 'aligned' model the fine-tune
    differs from by less than a 4-bit rounding step (~0.28 of the spread), so rounding alone can reach towards it."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, dst)
    f = dst / "model.safetensors"
    sd = load_file(f)
    g = torch.Generator().manual_seed(7)
    for k, v in sd.items():
        if ".layers." in k and v.ndim == 2:
            sd[k] = (v.float() + rel * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
    save_file(sd, f, metadata={"format": "pt"})
    return dst


def test_distill_term_pulls_harmful_states_towards_the_aligned_model(tiny, planted, tmp_path):
    """--distill-weight: the harmful prompts' states move towards the aligned model's own (every layer's relative
    error to them falls from its RTN start), at a bounded benign cost; off, the term does not exist (0 in the
    stats) and the aligned model is not read."""
    probes, _ = planted
    aligned = _aligned_twin(tiny, tmp_path / "aligned")
    plan = make_plan(tiny, tmp_path / "o.gguf", "Q4_0")
    stats: list = []
    settings = RealignSettings(**{**SETTINGS, "iters": 24}, harm_weight=0.0, distill_weight=1.0, lr=0.05)
    realign_model(tiny, plan, probes, settings, checkpoint_dir=tmp_path / "d", aligned=aligned,
                  report=lambda i, n, s, r: stats.append(s))
    plain: list = []
    realign_model(tiny, plan, probes, replace_settings(settings, distill_weight=0.0),
                  checkpoint_dir=tmp_path / "p", report=lambda i, n, s, r: plain.append(s))
    for s, p in zip(stats, plain):
        assert s.distill_start > 0 and s.distill_end < 0.5 * s.distill_start, (s.distill_start, s.distill_end)
        assert p.distill_start == p.distill_end == 0.0
        assert s.benign_end <= 3.0 * p.benign_end
    with pytest.raises(AssertionError, match="aligned model"):  # the term without its targets is a wiring bug
        realign_model(tiny, plan, probes, settings, checkpoint_dir=tmp_path / "x")


def replace_settings(s: RealignSettings, **kw) -> RealignSettings:
    from dataclasses import replace

    return replace(s, **kw)


def test_distill_weight_needs_the_aligned_model(tiny, planted, tmp_path):
    _, probe_file = planted
    base = ["convert", str(tiny), "-o", str(tmp_path / "o.gguf"), "--outtype", "Q4_0"]
    _fails(base + ["--probes", str(probe_file), "--distill-weight", "1"], "give --aligned")
    _fails(base + ["--probes", str(probe_file), "--aligned", str(tiny)], "not both")
    _fails(base + ["--aligned", str(tiny), "--distill-weight", "-1"], "--distill-weight")
    assert not (tmp_path / "o.gguf").exists()


def test_distill_loss_leaves_the_shared_prefix_to_the_benign_term():
    """The distill term ignores the positions every calibration prompt shares (the template's system part) and
    counts the rest, the last token twice (last_weight)."""
    import torch

    from qrealign_gguf.realign.calibrate import AlignedStates, distill_loss, pad
    from qrealign_gguf.realign.pipeline import shared_prefix

    assert shared_prefix([[1, 2, 3, 9], [1, 2, 3, 7, 8], [1, 2, 4]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # the last token always counts
    xs = [torch.randn(1, 6, 4), torch.randn(1, 5, 4)]
    kws = [{}, {}]
    p = pad(xs, kws, [0, 1])
    target = [x.clone() for x in xs]
    for t in target:
        t[0, :3] += 10.0  # differ only on the shared prefix
    assert distill_loss(p.x, AlignedStates(target, skip=3), kws, [0, 1], p, 1.0).item() == 0.0
    assert distill_loss(p.x, AlignedStates(target, skip=0), kws, [0, 1], p, 1.0).item() > 0.5
    target[1][0, 4] += 1.0  # the last token of prompt 1: counted in both terms
    assert distill_loss(p.x, AlignedStates(target, skip=3), kws, [0, 1], p, 1.0).item() > 0


def test_convert_with_probes_and_the_aligned_model_for_the_distill_term(tiny, planted, tmp_path):
    """`convert --probes P --aligned A --distill-weight W`: the probes come from the file, the aligned model's
    states feed the distill term; the file records the weight and llama.cpp runs it."""
    from qrealign_gguf.gguf_file import read_gguf

    _, probe_file = planted
    aligned = _aligned_twin(tiny, tmp_path / "aligned")
    out = tmp_path / "d.gguf"
    r = runner.invoke(app, ["convert", str(tiny), "-o", str(out), "--outtype", "Q4_0", "--probes", str(probe_file),
                            "--aligned", str(aligned), "--distill-weight", "0.5", "--realign-samples", "4",
                            "--realign-iters", "2"])
    assert r.exit_code == 0, r.output
    assert read_gguf(out).scalar("qrealign.realign_distill_weight") == 0.5
    from qrealign_gguf.llamacpp import logits
    assert np.isfinite(logits(out, [1, 2, 3, 4])).all()
