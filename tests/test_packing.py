"""realign/packing.py: a decoder layer run on a packed batch (shared prefix once, each prompt's own tokens after
it) gives the padded batch's outputs and gradients at every real token, for every supported family (their
layers, rotary tables and masks as the HF decoder hands them over, sliding windows included)."""
from __future__ import annotations

import pytest
import torch

from qrealign_gguf.realign.calibrate import _run, pad
from qrealign_gguf.realign.packing import pack, unpack

from test_families import _config

CASES = ["llama-smollm2", "llama3-rope-bpe", "mistral-spm", "qwen2-bpe", "gemma2-spm", "gemma3-json"]


def _recorded(case: str, lens: list[int], prefix: int):
    """A tiny model of the family; per prompt (token ids sharing their first `prefix`), every layer's input and the
    kwargs its decoder passed, recorded as onload.record does (one unpadded prompt per forward)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(case, 96)).eval()  # its default: SDPA, eager for gemma2
    dec = model.model if hasattr(model.model, "layers") else model.model.language_model
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 90, (prefix,), generator=g)
    ids = [torch.cat([shared, torch.randint(3, 90, (n - prefix,), generator=g)])[None] for n in lens]
    xs: list[list[torch.Tensor]] = [[] for _ in dec.layers]
    kws: list[list[dict]] = [[] for _ in dec.layers]

    def hook(i: int):  # noqa: ANN202
        def fn(_m, args, kwargs):  # noqa: ANN001, ANN202
            h = args[0] if args else kwargs["hidden_states"]
            xs[i].append(h.detach().clone())
            kws[i].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        return fn

    hs = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(dec.layers)]
    with torch.no_grad():
        for s in ids:
            dec(s, use_cache=False)
    for h in hs:
        h.remove()
    return dec.layers, xs, kws


@pytest.mark.parametrize("case", CASES)
def test_packed_layer_equals_padded(case: str) -> None:
    lens, prefix = [9, 14, 6, 11], 5  # gemma's sliding window is 4: the recorded masks are not plain causal
    layers, xs, kws = _recorded(case, lens, prefix)
    idx = list(range(len(lens)))
    for i, layer in enumerate(layers):
        weights = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters() if p.ndim == 2}
        p = pad(xs[i], kws[i], idx)
        pk = pack(xs[i], kws[i], idx, prefix)
        assert pk is not None, (case, i)
        assert pk.x.shape[1] == prefix + sum(n - prefix for n in lens)
        ref = _run(layer, weights, p.x, p.kwargs)
        got = unpack(_run(layer, weights, pk.x, pk.kwargs), pk)
        m = p.mask[..., None]
        assert torch.allclose(got * m, ref * m, atol=1e-5, rtol=1e-4), (case, i, float(((got - ref) * m).abs().max()))
        # the gradients of a loss over real tokens: the shared prefix counts once per prompt, as padded
        probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(i)) * m
        g_ref = torch.autograd.grad((ref * probe).sum(), list(weights.values()))
        g_got = torch.autograd.grad((got * probe).sum(), list(weights.values()))
        for a, b in zip(g_got, g_ref):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (case, i, float((a - b).abs().max()))


def test_pack_declines_what_it_cannot_index() -> None:
    """A kwarg with the prompt's length that is not a known position input, or a mask of another shape: None (the
    caller pads), never a silently wrong batch."""
    x = [torch.randn(1, n, 8) for n in (5, 7)]
    base = {"attention_mask": None, "position_ids": torch.arange(7)[None]}
    ok = [dict(base, position_ids=torch.arange(5)[None]), base]
    assert pack(x, ok, [0, 1], 2) is not None
    assert pack(x, [ok[0], dict(base, token_type_ids=torch.zeros(1, 7))], [0, 1], 2) is None
    assert pack(x, [ok[0], dict(base, attention_mask=torch.zeros(1, 2, 7, 7))], [0, 1], 2) is None
    assert pack(x, [ok[0], {"position_ids": base["position_ids"]}], [0, 1], 2) is None
