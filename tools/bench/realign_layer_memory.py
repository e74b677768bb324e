"""peak RSS of realign_layer on one synthetic qwen2 layer: python measure.py H I N T BATCH ITERS QTYPE"""
import resource, sys, time
import torch
torch.set_num_threads(1)
H, I, N, T, B, IT, QT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
from qrealign_gguf.formats.types import qtype
from qrealign_gguf.realign.calibrate import RealignSettings, Target, realign_layer
heads = max(1, H // 64); kv = max(1, heads // 7) if heads % 7 == 0 else max(1, heads // 2)
cfg = Qwen2Config(hidden_size=H, intermediate_size=I, num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=1)
cfg._attn_implementation = "sdpa"
layer = Qwen2DecoderLayer(cfg, 0).eval()
with torch.no_grad():
    for p in layer.parameters():
        if p.ndim == 2: p.normal_(0, 0.02)
rot = Qwen2RotaryEmbedding(cfg)
def kw(t):
    pos = torch.arange(t)[None]
    x = torch.zeros(1, t, H)
    return {"position_embeddings": rot(x, pos), "attention_mask": None, "position_ids": pos, "use_cache": False}
g = torch.Generator().manual_seed(0)
xs = [torch.randn(1, T, H, generator=g) for _ in range(2 * N)]
kws = [kw(T) for _ in range(2 * N)]
with torch.no_grad():
    ys = [layer(x, **k) for x, k in zip(xs[:N], kws[:N])]
    ys = [y[0] if isinstance(y, tuple) else y for y in ys]
def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

# the peak is measured from here: reset the kernel's high-water mark (Linux: "5" > clear_refs), so that a higher
# peak earlier in the process (imports, building the layer) cannot hide realign_layer's growth
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS:")
    peak_kib = lambda: _status("VmHWM:")  # noqa: E731
except OSError:  # no procfs: the process-lifetime peak (can understate the growth)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
mods = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
targets = [Target(m, f"blk.0.{m}", qtype(QT)) for m in mods]
W = sum(layer.get_submodule(m).weight.numel() for m in mods)
score = lambda h: h[..., :8].sum(-1)
t0 = time.perf_counter()
realign_layer(layer, targets, (xs[:N], ys, kws[:N]), (xs[N:], kws[N:]), score, 1.0, -1.0,
              RealignSettings(iters=IT, batch=B), 0)
dt = time.perf_counter() - t0
peak = peak_kib()
print(f"H={H} I={I} N={N} T={T} B={B} iters={IT} {QT} W={W} base={base/1024:.0f}MiB peak={peak/1024:.0f}MiB delta={(peak-base)/1024:.0f}MiB per_weight={(peak-base)*1024/W:.1f}B time={dt:.1f}s")
