"""Wall time of realign_layer on one synthetic qwen2 layer (realign_layer_memory.py's), in one process or data
parallel under torchrun (each rank calibrates its shard of the prompts, dist.py):

    python -m tools.bench.realign_layer_dp H I N T BATCH ITERS QTYPE THREADS                       # 1 rank
    torchrun --standalone --nproc-per-node 2 -m tools.bench.realign_layer_dp H I N T BATCH ITERS QTYPE 1

Prints (rank 0) the seconds of realign_layer and a digest of the learned blocks (equal across repeated runs with
the same number of ranks)."""
from __future__ import annotations

import hashlib
import sys
import time

import torch


def main(argv: list[str]) -> None:
    h, inter, n, t, batch, iters, qt, threads = (*map(int, argv[:6]), argv[6], int(argv[7]))
    torch.set_num_threads(threads)
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    from qrealign_gguf import dist
    from qrealign_gguf.formats.types import qtype
    from qrealign_gguf.realign.calibrate import RealignSettings, Target, realign_layer

    torch.manual_seed(0)
    heads = max(1, h // 64)
    cfg = Qwen2Config(hidden_size=h, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    rot = Qwen2RotaryEmbedding(cfg)
    pos = torch.arange(t)[None]
    kw = {"position_embeddings": rot(torch.zeros(1, t, h), pos), "attention_mask": None, "position_ids": pos,
          "use_cache": False}
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, t, h, generator=g) for _ in range(2 * n)]
    with dist.session("cpu") as world:
        mine_b = list(dist.shard_indices(world, n))  # every rank builds all prompts (same seed), keeps its shard
        mine_h = [n + i for i in dist.shard_indices(world, n)]
        with torch.no_grad():
            ys = {i: layer(xs[i], **kw) for i in mine_b}
        ys = {i: y[0] if isinstance(y, tuple) else y for i, y in ys.items()}
        mods = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"]
        targets = [Target(m, f"blk.0.{m}", qtype(qt)) for m in mods]
        dist.barrier(world)
        t0 = time.perf_counter()
        packed, _, _ = realign_layer(layer, targets, ([xs[i] for i in mine_b], [ys[i] for i in mine_b], [kw] * len(mine_b)),
                                     ([xs[i] for i in mine_h], [kw] * len(mine_h)), lambda s: s[..., :8].sum(-1), 1.0,
                                     -1.0, RealignSettings(iters=iters, batch=batch), 0,
                                     world=world if world.size > 1 else None)
        dt = time.perf_counter() - t0
        if world.is_main:
            digest = hashlib.sha256(b"".join(packed[k].tobytes() for k in sorted(packed))).hexdigest()[:16]
            print(f"ranks={world.size} threads={threads} H={h} I={inter} N={n} T={t} B={batch} iters={iters} {qt} "
                  f"realign_layer {dt:.1f} s blocks sha256:{digest}")


if __name__ == "__main__":
    main(sys.argv[1:])
