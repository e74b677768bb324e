"""Prompts -> token ids with the chat template, and per-layer last-token states of an HF decoder."""
from __future__ import annotations

import hashlib

import torch

from ..chat import chat_ids
from ..prompts import Prompt


def template_fingerprint(tok) -> str:  # noqa: ANN001
    src = (getattr(tok, "chat_template", None) or "") + "|" + str(len(tok))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def decoder(model) -> torch.nn.Module:  # noqa: ANN001 - HF causal LM
    """The decoder stack without the LM head: hidden states are all we need, and the head (vocab x hidden)
    would cost as much as several layers per token."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)  # multimodal wrappers (gemma3)
    if getattr(inner, "layers", None) is None:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found")
    return inner


def decoder_layers(model) -> torch.nn.ModuleList:  # noqa: ANN001 - HF causal LM
    return decoder(model).layers


@torch.inference_mode()
def last_token_states(model, tok, prompts: list[Prompt], max_tokens: int = 256,  # noqa: ANN001
                      progress=None, batch: int = 8) -> torch.Tensor:  # noqa: ANN001
    """(n_prompts, n_layers, hidden): every decoder layer's OUTPUT (pre final norm) at the last prompt token, from a
    model held whole in memory (layerwise_last_token_states reads one layer at a time).
    Prompts of similar length run as right-padded batches: under causal attention a real token never sees the
    padding after it, so its state is the unpadded one up to float summation order (~1e-6 relative)."""
    layers = decoder_layers(model)
    grabbed: list[torch.Tensor] = [torch.empty(0)] * len(layers)

    def hook(i: int):  # noqa: ANN202
        def fn(_m, _inp, out):  # noqa: ANN001, ANN202
            grabbed[i] = (out[0] if isinstance(out, tuple) else out).float()
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    ids = [chat_ids(tok, p.text, max_tokens, p.system) for p in prompts]
    rows: list[torch.Tensor | None] = [None] * len(ids)
    done = 0
    try:
        for idx, x, mask in padded_batches(ids, batch):
            decoder(model)(x.to(device), attention_mask=mask.to(device), use_cache=False)
            for j, i in enumerate(idx):
                rows[i] = torch.stack([g[j, len(ids[i]) - 1] for g in grabbed]).cpu()
            done += len(idx)
            if progress:
                progress(done, len(ids))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows)  # type: ignore[arg-type]


def padded_batches(ids: list[list[int]], batch: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Prompts of similar length together (little padding): (prompt indices, right-padded ids, attention mask)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = []
    for k in range(0, len(order), max(1, batch)):
        idx = order[k : k + batch]
        width = max(len(ids[i]) for i in idx)
        x = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            x[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = 1
        out.append((idx, x, mask))
    return out


@torch.inference_mode()
def layerwise_last_token_states(model_dir, tok, prompts: list[Prompt], max_tokens: int = 256,  # noqa: ANN001
                                progress=None, batch: int = 8, offload_dir=None,  # noqa: ANN001
                                family=None) -> torch.Tensor:  # noqa: ANN001
    """last_token_states of the model in model_dir, read one decoder layer at a time (onload.py): the same right-
    padded batches and masks, so bitwise the same states, with memory of one layer plus one layer's activations
    (in files under offload_dir when given). progress(layers done, n_layers)."""
    from .onload import Onloaded, run_layer, token_rows
    from .streams import Store

    ids = [chat_ids(tok, p.text, max_tokens, p.system) for p in prompts]
    batches = padded_batches(ids, batch)
    m = Onloaded(model_dir, family)
    last: list[list[torch.Tensor]] = [[] for _ in ids]  # per prompt, per layer
    with Store(offload_dir) as store:
        xs = store.stream("x0")
        kws = m.record([(x, mask) for _, x, mask in batches], token_rows([x for _, x, _ in batches]), xs)
        for i in range(m.n_layers):
            layer = m.layer(i)
            nxt = store.stream(f"x{i + 1}")
            for b, (idx, _, _) in enumerate(batches):
                h = run_layer(layer, xs[b], kws[i][b]).float()
                for j, k in enumerate(idx):
                    last[k].append(h[j, len(ids[k]) - 1].clone())
                nxt.append(h)
            m.release(layer)
            xs.drop()
            xs = nxt
            if progress:
                progress(i + 1, m.n_layers)
        xs.drop()
    return torch.stack([torch.stack(r) for r in last])


def model_signature(model_dir) -> dict[str, str]:  # noqa: ANN001 - str | Path
    """What must agree between the aligned model (probes) and the fine-tuned model being realigned:
    architecture, geometry and tokenizer. Weights differ by design, so they are not part of it."""
    from ..hf_model import HFModel

    m = HFModel(model_dir)
    tok_hash = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model"):
        f = m.file(name)
        if f is not None:
            tok_hash.update(f.read_bytes())
    return {
        "architecture": m.architecture,
        "hidden_size": str(m.cfg("hidden_size")),
        "num_hidden_layers": str(m.cfg("num_hidden_layers")),
        "vocab_size": str(m.cfg("vocab_size")),
        "tokenizer_sha256": tok_hash.hexdigest()[:16],
    }


def check_compatible(expected: dict[str, str], actual: dict[str, str], what: str, where: str) -> None:
    """One clear error naming the first field that differs."""
    from ..errors import InputError

    for key in ("architecture", "hidden_size", "num_hidden_layers", "vocab_size", "tokenizer_sha256"):
        if key in expected and expected[key] != actual.get(key):
            raise InputError(f"{what} does not match {where}: {key} is {expected[key]} there, {actual.get(key)} here; "
                             "use an aligned model (or probes) of the same base model")
