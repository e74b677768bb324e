"""Probe fitting on synthetic activations: separable -> accurate; noise -> unreliable; save/load identical."""
from __future__ import annotations

import json

import pytest
import torch

from qrealign_gguf.errors import InputError
from qrealign_gguf.realign.probes import ProbeSet, fit_contrast_probes, fit_probes


def _synthetic(n=200, layers=3, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)]).long()
    x = torch.randn(n, layers, hidden, generator=g) * 3 + 5  # offset + scale: standardization must handle it
    direction = torch.randn(hidden, generator=g)
    x[:, 1] += (y.float() * 2 - 1)[:, None] * direction * 2  # layer 1: linearly separable
    return x, y


def test_separable_layer_is_found_and_noise_is_not():
    x, y = _synthetic()
    p = fit_probes(x, y, min_acc=0.9)
    assert p.heldout_acc[1] >= 0.95
    assert p.heldout_acc[0] < 0.8 and p.heldout_acc[2] < 0.8  # pure noise layers
    assert p.reliable == [1]
    harmful_side = p.score(1, x[y == 1, 1])
    assert (harmful_side > 0).float().mean() > 0.95


def test_target_is_the_aligned_harmful_median():
    x, y = _synthetic()
    p = fit_probes(x, y)
    s = p.score(1, x[y == 1, 1])
    assert p.target[1] > 0  # on the harmful side, and typical of harmful prompts
    assert 0.3 < (s > p.target[1]).float().mean() < 0.7
    assert p.target_benign[1] < 0 and 0.3 < (p.score(1, x[y == 0, 1]) > p.target_benign[1]).float().mean() < 0.7


def test_quantization_sized_noise_does_not_flip_a_regularized_probe():
    """Conditioning: a near-constant feature that happens to separate the classes (by 1e-4) must not dominate.
    Noise of 1e-3 -- tiny next to the real class separation -- flips ~1/3 of the predictions of a probe
    standardized without a floor (measured: 0.64-0.69 agreement), none with the floor."""
    x, y = _synthetic()
    g = torch.Generator().manual_seed(1)
    x[:, 1, 0] = 5 + 1e-4 * (2 * y.float() - 1) + 2e-5 * torch.randn(x.shape[0], generator=g)
    p = fit_probes(x, y)
    noisy = x[:, 1] + 1e-3 * torch.randn(x[:, 1].shape, generator=torch.Generator().manual_seed(2))
    assert ((p.score(1, noisy) > 0) == (p.score(1, x[:, 1]) > 0)).float().mean() > 0.97


def test_old_probe_files_are_refused(tmp_path):
    from safetensors.torch import save_file
    f = tmp_path / "old.safetensors"
    save_file({"w": torch.zeros(1, 2)}, str(f), metadata={"format": "qrealign-probes-v2"})
    with pytest.raises(InputError, match="older qrealign-gguf"):
        ProbeSet.load(f)


def test_score_is_differentiable():
    x, y = _synthetic()
    p = fit_probes(x, y)
    h = x[:4, 1].clone().requires_grad_(True)
    p.score(1, h).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_save_load_identical(tmp_path):
    x, y = _synthetic()
    p = fit_probes(x, y, meta={"architecture": "LlamaForCausalLM", "hidden_size": "16"})
    f = tmp_path / "probes.safetensors"
    p.save(f)
    q = ProbeSet.load(f)
    for k in ("mean", "std", "w", "b", "train_acc", "heldout_acc", "target", "target_benign"):
        assert torch.equal(getattr(p, k), getattr(q, k)), k
    assert q.reliable == p.reliable and q.meta == p.meta
    assert torch.equal(p.score(1, x[:, 1]), q.score(1, x[:, 1]))


def test_single_class_is_an_error():
    x, y = _synthetic()
    with pytest.raises(InputError, match="both harmful"):
        fit_probes(x[y == 1], y[y == 1])


def test_not_a_probe_file(tmp_path):
    from safetensors.torch import save_file
    f = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(f))
    with pytest.raises(InputError, match="not a qrealign probe file"):
        ProbeSet.load(f)
    with pytest.raises(InputError, match="does not exist"):
        ProbeSet.load(tmp_path / "missing.safetensors")


def _contrast_world(n=120, hidden=16, seed=0):
    """Both models see harmful content along `content`; only the aligned one adds `refuse` on harmful prompts
    (what a fine-tune that keeps recognizing harm but stops refusing looks like)."""
    g = torch.Generator().manual_seed(seed)
    content, refuse = torch.randn(hidden, generator=g), torch.randn(hidden, generator=g)
    refuse -= (refuse @ content) / (content @ content) * content  # orthogonal: a content probe cannot see it

    def states(harmful: bool, aligned: bool) -> torch.Tensor:
        x = 0.5 * torch.randn(n, 1, hidden, generator=g) + 3  # refusal term: small next to content, as measured
        return x + 2.0 * harmful * content + 0.5 * (harmful and aligned) * refuse

    return states(True, True), states(True, False), states(False, True), states(False, False), content, refuse


def test_contrast_probe_separates_refusing_from_complying_states():
    ah, fh, ab, fb, content, refuse = _contrast_world()
    p = fit_contrast_probes(ah, fh, fb)
    assert p.meta["kind"] == "contrast" and p.reliable == [0] and p.heldout_acc[0] >= 0.9
    assert (p.score(0, ah[:, 0]) > 0).float().mean() > 0.9  # aligned harmful: refusal side
    assert (p.score(0, fh[:, 0]) < 0).float().mean() > 0.9  # fine-tuned harmful: compliance side
    assert p.target[0] > 0 and p.target_benign[0] < p.target[0]
    # the content probe (the paper's) calls the fine-tuned harmful states harmful: it cannot see what was lost
    c = fit_probes(torch.cat([ah, ab]), torch.tensor([1] * len(ah) + [0] * len(ab)))
    assert c.meta["kind"] == "content" and (c.score(0, fh[:, 0]) > 0).float().mean() > 0.9


def test_contrast_probe_heldout_split_is_by_prompt():
    """A prompt's aligned and fine-tuned states land on the same side of the split (no near-duplicate leak):
    with states that differ only in the refusal term, held-out accuracy still comes from unseen prompts."""
    ah, fh, ab, fb, *_ = _contrast_world(n=40)
    p = fit_contrast_probes(ah, fh, fb, heldout=0.25)
    assert p.heldout_acc[0] >= 0.9
    with pytest.raises(InputError, match="both models"):
        fit_contrast_probes(ah, fh[:-1], fb)


def _persona_world(n=120, hidden=16, seed=1):
    """An identity-shift fine-tune (attack (c)): it moves EVERY prompt along `persona` (strongly) and removes the
    aligned model's `refuse` term on harmful prompts. Rows: aligned/fine-tuned x harmful/benign, paired by prompt."""
    g = torch.Generator().manual_seed(seed)
    content, refuse, persona = (torch.randn(hidden, generator=g) for _ in range(3))
    base_h = 0.5 * torch.randn(n, 1, hidden, generator=g) + 3 + 2.0 * content
    base_b = 0.5 * torch.randn(n, 1, hidden, generator=g) + 3
    ah, fh = base_h + 0.5 * refuse, base_h + 2.0 * persona
    ab, fb = base_b.clone(), base_b + 2.0 * persona
    return ah, fh, ab, fb, base_h, refuse, persona


def test_excluding_the_benign_shift_leaves_refusal_alone():
    """The plain contrast probe mostly measures the persona: a harmful state with the old identity back but no
    refusal (what realignment produced on the identity testbed: "I am Qwen, ..." and an answer) scores as
    refusing. With the benign shift excluded the probe ignores the persona: that state stays on the compliance
    side, and a state with refusal back under the persona is on the refusal side."""
    ah, fh, ab, fb, base_h, refuse, persona = _persona_world()
    identity_back = base_h  # persona gone, refusal not back
    refusal_back = fh + 0.5 * refuse  # refusal back, persona kept
    plain = fit_contrast_probes(ah, fh, fb)
    assert (plain.score(0, identity_back[:, 0]) > 0).float().mean() > 0.9  # fooled
    p = fit_contrast_probes(ah, fh, fb, aligned_benign=ab)
    assert p.meta["benign_shift"] == "removed" and p.reliable == [0]
    assert (p.score(0, identity_back[:, 0]) < 0).float().mean() > 0.9
    assert (p.score(0, refusal_back[:, 0]) > 0).float().mean() > 0.9
    # exactly blind to the benign shift (in the probe's standardized space), and the share it removed is recorded
    d = ((ab - fb)[:, 0] / p.std[0]).mean(0)
    assert abs(float(p.w[0] @ d)) < 1e-5 * float(p.w[0].norm() * d.norm())
    cos = json.loads(p.meta["benign_shift_cos"])
    assert len(cos) == 1 and cos[0] > 0.8  # on harmful prompts too, the fine-tune mostly changed the persona
    with pytest.raises(InputError, match="same benign prompts"):
        fit_contrast_probes(ah, fh, fb, aligned_benign=ab[:-1])


def test_excluding_the_benign_shift_needs_contrast_probes(tmp_path):
    from qrealign_gguf import api

    with pytest.raises(InputError, match="--contrast"):
        api.probe_model(tmp_path, tmp_path / "p.safetensors", exclude_benign_shift=True)
