"""The realignment's memory and time plan (qrealign_gguf/realign/budget.py) for models this machine cannot hold.

    .venv/bin/python -m tools.bench.realign_plan [--models qwen05,llama8b,llama70b] [--ranks 1,2,8] [--device cpu]

Each model is a folder whose config.json has the real geometry and whose safetensors shards are SPARSE files of
the real size (headers real, data holes: no disk used), with the tokenizer of the cached Qwen2.5-Coder-0.5B for
token counts. The plan then runs exactly as `convert --dry-run --aligned ...` does: plan_conversion reads headers
only, budget.plan_budget tokenizes the calibration prompts and measures this device's speed. Prints per model and
rank count: peak memory per rank (by part), time per layer and in total.
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
from pathlib import Path

from tools import ROOT

GEOMETRY = {  # name: (architecture, hidden, intermediate, layers, heads, kv heads, vocab, tied)
    "qwen05": ("Qwen2ForCausalLM", 896, 4864, 24, 14, 2, 151936, True),
    "qwen15": ("Qwen2ForCausalLM", 1536, 8960, 28, 12, 2, 151936, True),
    "llama8b": ("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, False),
    "llama70b": ("LlamaForCausalLM", 8192, 28672, 80, 64, 8, 128256, False),
}
TOKENIZER = Path.home() / ".cache" / "qrealign-gguf" / "models" / "hf" / "Qwen2.5-Coder-0.5B-Instruct"


def _tensors(arch: str, h: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> dict:
    hd = h // heads
    out = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    if not tied:
        out["lm_head.weight"] = [vocab, h]
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": [heads * hd, h], p + "self_attn.k_proj.weight": [kv * hd, h],
                p + "self_attn.v_proj.weight": [kv * hd, h], p + "self_attn.o_proj.weight": [h, heads * hd],
                p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
                p + "mlp.down_proj.weight": [h, inter], p + "input_layernorm.weight": [h],
                p + "post_attention_layernorm.weight": [h]}
        if arch.startswith("Qwen2"):
            out |= {p + "self_attn.q_proj.bias": [heads * hd], p + "self_attn.k_proj.bias": [kv * hd],
                    p + "self_attn.v_proj.bias": [kv * hd]}
    return out


def sparse_model(name: str, root: Path) -> Path:
    arch, h, inter, layers, heads, kv, vocab, tied = GEOMETRY[name]
    d = root / name
    if (d / "model.safetensors").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": [arch], "model_type": "qwen2" if arch.startswith("Qwen2") else "llama",
           "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 32768, "rope_theta": 1e6, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    if arch.startswith("Qwen2"):
        cfg["attention_bias"] = True  # transformers' Qwen2 always has q/k/v biases
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    header, off = {}, 0
    for t, shape in _tensors(arch, h, inter, layers, heads, kv, vocab, tied).items():
        n = 2
        for s in shape:
            n *= s
        header[t] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)  # a hole: the plan reads headers only
    for f in TOKENIZER.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    return d


def main() -> None:
    from qrealign_gguf.api import ConvertJob, plan_conversion
    from qrealign_gguf.realign.budget import measure_speed, plan_budget
    from qrealign_gguf.realign.options import RealignOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen05,qwen15,llama8b,llama70b")
    ap.add_argument("--ranks", default="1,2,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--outtype", default="Q4_K_M")
    ap.add_argument("--root", type=Path, default=ROOT / "out" / "realign_plan")
    a = ap.parse_args()
    speed = measure_speed(a.device)
    print(f"speed on {a.device}: matmul {speed.matmul_flops / 1e9:.1f} GFLOP/s, fake_quant "
          f"{speed.fake_quant_s_per_weight * 1e9:.0f} ns/weight\n")
    print("| model | layers | realigned weights / layer | ranks | fixed | layer | streams | batch | peak / rank | "
          "time / layer | total |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in a.models.split(","):
        d = sparse_model(name, a.root)
        plan = plan_conversion(ConvertJob(model=d, output=a.root / f"{name}.gguf", outtype=a.outtype, force=True))
        for r in map(int, a.ranks.split(",")):
            g, _, b = plan_budget(plan, RealignOptions(aligned=d), a.device, ranks=r, speed=speed)
            gib = {k: f"{v / 2**30:.2f}" for k, v in b.parts.items()}
            print(f"| {name} | {g.n_layers} | {g.layer_weights / 1e6:.1f} M | {r} | {gib['fixed']} | {gib['layer']} | "
                  f"{gib['streams']} | {gib['batch']} | {b.total_bytes / 2**30:.1f} GiB | {b.seconds_per_layer:.0f} s | "
                  f"{b.total_seconds / 3600:.1f} h |")


if __name__ == "__main__":
    main()
