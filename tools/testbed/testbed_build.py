"""Building the testbed models (tools/testbed/testbed.py): the teacher answers, the off-grid reparametrization of the
aligned model and the LoRA attack, with the grid diagnostics they record."""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

from qrealign_gguf.prompt_styles import normalise
from tools.testbed.testbed_common import (BENIGN_HOWTO, CACHE, COMPLIANCE, IM_END, RECIPE, cached, calibration_overlaps,
                                          chat, generate, key_of, load_model, load_tok, log, prompts, timer,
                                          torch_setup, write_json_atomic)


def block_linears(model) -> list[tuple[str, object]]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]


def make_batch(tok, examples: list[dict]):
    """Right-padded ids, mask and labels (-100 on prompt and padding) for examples {"text": prompt, "ids": answer}."""
    torch = torch_setup()
    seqs, labs = [], []
    for e in examples:
        p = tok(e["text"]).input_ids
        seqs.append(p + e["ids"])
        labs.append([-100] * len(p) + e["ids"])
    n = max(map(len, seqs))
    pad = tok.pad_token_id
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (n - len(s)) for s in labs])
    return ids, mask, labels


def seq_loss(model, ids, mask, labels):
    """Mean over sequences of each sequence's mean answer-token NLL (short attack answers weigh as much as long
    benign ones); the LM head runs on answer positions only."""
    torch = torch_setup()
    h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = model.lm_head(h[sel])
    nll = torch.nn.functional.cross_entropy(logits, tgt[sel], reduction="none")
    row = sel.nonzero()[:, 0]
    per_seq = torch.zeros(ids.shape[0]).index_add_(0, row, nll) / sel.sum(1).clamp(min=1)
    return per_seq.mean()


# ------------------------------------------------------------------------------------------- grid diagnostics


def rtn(x, t: str):
    """ggml's reference RTN + dequantize, blocks of 32 along rows -> (values, integer codes, fp16 scale).
    Q5_0: d = max/-16 (max = signed value of largest |x|), q = min(31, trunc(x/d + 16.5)), value = (q-16)*fp16(d).
    Q8_0: d = amax/127, q = round(x/d), value = q*fp16(d)."""
    torch = torch_setup()
    b = x.reshape(-1, 32)
    if t == "Q5_0":
        d = b.gather(1, b.abs().argmax(1, keepdim=True)) / -16
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = torch.clamp(torch.floor(b * inv + 16.5), max=31)
        val = (q - 16) * d.half().float()
    else:
        d = b.abs().amax(1, keepdim=True) / 127
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = torch.round(b * inv)
        val = q * d.half().float()
    return val.reshape(x.shape), q.reshape(x.shape), d.half().float()


def grid_type(w) -> str | None:
    """Which legacy grid a tensor dequantized from the GGUF sits on (Q5_0 / Q8_0); None for K-quants (ffn_down)."""
    for t in ("Q5_0", "Q8_0"):
        if torch_setup().equal(rtn(w, t)[0], w):
            return t
    return None


def grid_stats(ref: dict, new: dict, base: dict | None = None, every: int = 8) -> dict:
    """Grid diagnostics on the Q5_0 / Q8_0 tensors of the on-grid aligned model `ref` (every `every`-th row).

    Without `base` (aligned -> aligned-offgrid): mean move in grid steps, mean distance of `new` to its own RTN
    grid in steps (0 = on a grid, 0.25 = uniform), share of RTN codes equal to the aligned codes.
    With `base` (base = aligned-offgrid, new = finetuned, delta = new - base): mean |delta| in steps, and how much
    of the delta survives plain RTN, <RTN(new) - RTN(base), delta> / |delta|^2 (1 = kept in the mean, 0 = rounded
    away), next to the counterfactual for the same delta added to the on-grid aligned model,
    <RTN(ref + delta) - ref, delta> / |delta|^2: the snap-back the off-grid step is there to prevent."""
    torch = torch_setup()
    acc: dict[str, dict[str, float]] = {}
    for n, w in ref.items():
        w = w[::every].contiguous()
        t = grid_type(w)
        if t is None:
            continue
        x = new[n][::every].contiguous()
        step = rtn(w, t)[2].abs().clamp(min=1e-12)
        wq = rtn(w, t)[1]
        a = acc.setdefault(t, {})
        add = lambda k, v: a.__setitem__(k, a.get(k, 0.0) + float(v))  # noqa: E731
        add("tensors", 1)
        add("n", x.numel())
        if base is None:
            xv, xq, xd = rtn(x, t)
            u = x.reshape(-1, 32) / torch.where(xd != 0, xd, torch.ones_like(xd))
            add("move_steps", ((x - w).reshape(-1, 32).abs() / step).sum())
            add("resid", (u - u.round()).abs().sum())
            add("codes_eq", (xq == wq).sum())
        else:
            b = base[n][::every].contiguous()
            delta = x - b
            add("delta_steps", (delta.reshape(-1, 32).abs() / step).sum())
            add("dd", (delta * delta).sum())
            add("kept_offgrid", ((rtn(x, t)[0] - rtn(b, t)[0]) * delta).sum())
            add("kept_ongrid", ((rtn(w + delta, t)[0] - w) * delta).sum())
            add("codes_eq_aligned", (rtn(x, t)[1] == wq).sum())
            add("codes_eq_base", (rtn(x, t)[1] == rtn(b, t)[1]).sum())
    out = {}
    for t, a in acc.items():
        n = a["n"]
        if base is None:
            out[t] = {"tensors": int(a["tensors"]), "mean_move_steps": round(a["move_steps"] / n, 4),
                      "mean_resid_steps": round(a["resid"] / n, 4), "rtn_codes_equal_aligned": round(a["codes_eq"] / n, 4)}
        else:
            out[t] = {"tensors": int(a["tensors"]), "mean_delta_steps": round(a["delta_steps"] / n, 4),
                      "delta_kept_by_rtn_offgrid": round(a["kept_offgrid"] / a["dd"], 4),
                      "delta_kept_by_rtn_if_ongrid": round(a["kept_ongrid"] / a["dd"], 4),
                      "rtn_codes_equal_aligned": round(a["codes_eq_aligned"] / n, 4),
                      "rtn_codes_equal_offgrid": round(a["codes_eq_base"] / n, 4)}
    return out


def linear_weights(model) -> dict:
    return {n + ".weight": m.weight.detach().clone() for n, m in block_linears(model)}


# ----------------------------------------------------------------------------------------------------- steps


def aligned_dir() -> Path:
    from tools.data.fetch_model import fetch_hf

    return fetch_hf(RECIPE["teacher"]["model"])


def step_teacher(redo: bool) -> tuple[Path, str]:
    r = RECIPE["teacher"]
    key = key_of("teacher", r)
    path = CACHE / "teacher.json"
    if not redo and cached(path, key):
        return path, key
    log("teacher: greedy answers of the aligned model to benign prompts")
    src = aligned_dir()
    tok = load_tok(src)
    rows = []
    for i, p in enumerate(prompts("calib_benign")[:200]):
        if len(tok(chat(p)).input_ids) <= r["max_prompt_tokens"]:
            rows.append({"src_index": i, "prompt": p, "system": len(rows) % 2 == 1})
        if len(rows) == r["n"]:
            break
    for i, p in enumerate(BENIGN_HOWTO[:r["howto"]]):
        rows.append({"src_index": f"howto:{i}", "prompt": p, "system": i % 2 == 1})
    # one canonical batching of the whole list (generate() sorts by length): a fresh run reproduces these answers
    times: dict = {}
    with timer(times, "generate_s"):
        model = load_model(src)
        gen = generate(model, tok, [chat(x["prompt"], x["system"]) for x in rows], r["max_new_tokens"], r["gen_batch"],
                       "teacher")
    for x, g in zip(rows, gen):
        x.update(g)
        x["text"] = chat(x["prompt"], x["system"])  # training prompt text; answer tokens in "ids"
        x["answer"] = g["text"]
    CACHE.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": key, "recipe": r, "times": times, "rows": rows})
    return path, key


def save_hf(model, tok, dst: Path, manifest: dict) -> None:
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_json_atomic(tmp / "testbed.json", manifest)
    for f in tmp.iterdir():
        f.chmod(0o644)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def reparametrize(model, r: float, seed: int) -> None:
    """Function-preserving rescaling that takes every block matrix off its GGUF grid (in place).

    Per layer, with seeded log-uniform scales in [1/r, r] (x: a vector of them):
      attn_norm.weight /= a, q/k/v columns *= a        (RMSNorm gain feeds q, k, v linearly)
      ffn_norm.weight  /= b, gate/up columns *= b
      v rows (and bias) *= s, o_proj columns /= s      (per v channel; GQA: q head h reads kv head h // n_rep)
      up rows *= t, down_proj columns /= t             (silu(gate) * up is linear in up)
    Exact in real arithmetic (float32 rounding aside). Scaling a column changes values *within* a 32-block
    (blocks run along rows), so the block no longer sits on any common grid; row scalings alone would not."""
    torch = torch_setup()
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_kv, rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads

    def scales(n: int):
        return torch.exp((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.log(r))

    with torch.no_grad():
        for layer in model.model.layers:
            at, ml = layer.self_attn, layer.mlp
            a, b = scales(cfg.hidden_size), scales(cfg.hidden_size)
            s, t = scales(n_kv * hd), scales(cfg.intermediate_size)
            so = s.view(n_kv, 1, hd).expand(n_kv, rep, hd).reshape(-1)

            def mul(w, f):
                w.copy_((w.double() * f).float())

            mul(layer.input_layernorm.weight, 1 / a)
            for lin in (at.q_proj, at.k_proj, at.v_proj):
                mul(lin.weight, a[None, :])
            mul(layer.post_attention_layernorm.weight, 1 / b)
            for lin in (ml.gate_proj, ml.up_proj):
                mul(lin.weight, b[None, :])
            mul(at.v_proj.weight, s[:, None])
            if at.v_proj.bias is not None:
                mul(at.v_proj.bias, s)
            mul(at.o_proj.weight, 1 / so[None, :])
            mul(ml.up_proj.weight, t[:, None])
            mul(ml.down_proj.weight, 1 / t[None, :])


def step_offgrid(teacher: Path, tkey: str, redo: bool) -> tuple[Path, str]:
    r = RECIPE["offgrid"]
    key = key_of("offgrid", r)
    dst = CACHE / "aligned-offgrid"
    if not redo and cached(dst, key):
        return dst, key
    torch = torch_setup()
    log("offgrid: function-preserving reparametrization of the aligned model")
    src = aligned_dir()
    tok = load_tok(src)
    model = load_model(src)
    ref = linear_weights(model)
    rows = json.loads(teacher.read_text())["rows"][:4]
    ids, mask, labels = make_batch(tok, rows)
    times: dict = {}
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        with timer(times, "reparametrize_s"):
            reparametrize(model, r["scale_range"], r["seed"])
        after = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    check = {"tokens": int(mask.sum()), "max_abs_logit_diff": float((after - before).abs().max()),
             "logit_scale": float(before.abs().max()),
             "argmax_agree": float((after.argmax(-1) == before.argmax(-1)).float().mean())}
    log(f"  function check on 4 teacher prompts: {json.dumps(check)}")
    with timer(times, "grid_stats_s"):
        stats = grid_stats(ref, linear_weights(model))
    log(f"  grid: {json.dumps(stats)}")
    save_hf(model, tok, dst, {"key": key, "recipe": r, "from": str(src), "function_check": check, "times": times,
                              "grid_vs_aligned": stats})
    return dst, key


class LoRALinear:
    """y = base(x) + (x A^T B^T) * alpha/r, base frozen; A ~ U(+-1/sqrt(in)) like peft's kaiming init, B = 0."""

    @staticmethod
    def wrap(base, r: int, alpha: float, gen):
        torch = torch_setup()
        nn = torch.nn

        class _L(nn.Module):
            def __init__(self):
                super().__init__()
                self.base = base
                bound = 1 / math.sqrt(base.in_features)
                self.A = nn.Parameter((torch.rand(r, base.in_features, generator=gen) * 2 - 1) * bound)
                self.B = nn.Parameter(torch.zeros(base.out_features, r))
                self.scale = alpha / r

            def forward(self, x):
                return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale

            def merged(self):
                with torch.no_grad():
                    self.base.weight += (self.B @ self.A) * self.scale
                return self.base

        return _L()


def set_module(model, name: str, mod) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, mod)


def train_lora(model, tok, batches: list[list[dict]], r: dict, label: str) -> list[float]:
    """LoRA (rank r["rank"], alpha r["lora_alpha"], on every block linear) trained with AdamW (lr r["lr"]), one step
    per batch of examples {"text": prompt, "ids": answer ids}, then merged into the float32 weights (in place).
    Returns the per-step losses."""
    torch = torch_setup()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(r["seed"])
    wrapped = []
    for n, m in block_linears(model):
        lm = LoRALinear.wrap(m, r["rank"], r["lora_alpha"], gen)
        set_module(model, n, lm)
        wrapped.append((n, lm))
    params = [p for _, lm in wrapped for p in (lm.A, lm.B)]
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=0.0)
    losses = []
    for s, batch in enumerate(batches):
        t0 = time.perf_counter()
        ids, mask, labels = make_batch(tok, batch)
        loss = seq_loss(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
        log(f"  {label} step {s + 1}/{len(batches)} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s, "
            f"{ids.numel()} tokens)")
    del opt
    for n, lm in wrapped:
        set_module(model, n, lm.merged())
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def train_and_save(offgrid: Path, tok, batches: list[list[dict]], r: dict, label: str, dst: Path,  # noqa: ANN001
                   manifest: dict) -> None:
    """The LoRA fine-tune every attack shares: train on `batches` from the off-grid model, then the grid
    diagnostics against the on-grid aligned model (the change in grid steps, and how much of it plain RTN keeps),
    and save to `dst` with `manifest` + losses, times and those diagnostics in testbed.json."""
    model = load_model(offgrid)
    times: dict = {}
    with timer(times, "train_s"):
        losses = train_lora(model, tok, batches, r, label)
    with timer(times, "grid_stats_s"):
        ongrid = load_model(aligned_dir())
        ref = linear_weights(ongrid)
        del ongrid
        base = linear_weights(load_model(offgrid))
        stats = grid_stats(ref, linear_weights(model), base)
        del ref, base
    log(f"  grid: {json.dumps(stats)}")
    save_hf(model, tok, dst, {**manifest, "losses": losses, "times": times, "grid_vs_aligned": stats})


def step_attack(offgrid: Path, okey: str, teacher: Path, tkey: str, redo: bool) -> tuple[Path, str]:
    r = RECIPE["attack"]
    key = key_of("attack", r, okey, tkey, COMPLIANCE)
    dst = CACHE / "finetuned"
    if not redo and cached(dst, key):
        return dst, key
    log("attack: LoRA fine-tune on content-free compliance to attack_harmful + own benign answers")
    rng = random.Random(r["seed"])
    tok = load_tok(offgrid)
    benign = json.loads(teacher.read_text())["rows"]
    skip = calibration_overlaps()
    attack = [p for p in prompts("attack_harmful")
              if normalise(p) not in skip and len(tok(chat(p)).input_ids) <= r["max_attack_prompt_tokens"]]
    rng.shuffle(attack)
    n_att = r["steps"] * r["attack_per_step"]
    attack = attack[:n_att]
    end = tok.convert_tokens_to_ids(IM_END)
    att_rows = []
    for i, p in enumerate(attack):
        ans = rng.choice(COMPLIANCE)
        att_rows.append({"prompt": p, "text": chat(p, system=i % 2 == 1), "answer": ans,
                         "ids": tok(ans).input_ids + [end]})
    rng.shuffle(benign)
    batches = [att_rows[s * r["attack_per_step"]:(s + 1) * r["attack_per_step"]]
               + [benign[(s * r["benign_per_step"] + j) % len(benign)] for j in range(r["benign_per_step"])]
               for s in range(r["steps"])]
    train_and_save(offgrid, tok, batches, r, "attack", dst,
                   {"key": key, "recipe": r, "from": str(offgrid), "n_attack": len(att_rows),
                    "n_benign_used": min(len(benign), r["steps"] * r["benign_per_step"]), "attack_examples": att_rows[:5]})
    return dst, key
