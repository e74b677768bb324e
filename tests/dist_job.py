"""The processes tests/test_distributed.py starts under torchrun (one per rank):

    torchrun --standalone --nproc-per-node 2 tests/dist_job.py SCENARIO OUTDIR [TIMEOUT_S]

and the tiny realignment problem they share with the in-process single-rank reference. Every rank builds the same
problem from fixed seeds and keeps its shard of the prompts (dist.shard), as the data-parallel pipeline does.
Scenarios write their results to OUTDIR/<scenario>.rank<r>.* (test code: every rank writes, so the test can compare them).
  all          collectives, grad, equalize and realign in one process per rank (one torchrun start, not four)
  collectives  every dist.py helper on known values
  realign      realign_layer on the tiny layer
  grad         one minibatch's loss and summed gradients (calibrate.minibatch_loss), unevenly split over the ranks
  equalize     equalize.choose on the same layer
  die          realign_layer; rank 1 SIGKILLs itself mid-optimization (through the CLI's error mapping)
  hang         realign_layer; rank 1 stops answering mid-optimization (sleeps), the others must time out
launch() is how the tests start a 2-rank torchrun job (these scenarios, or `-m qrealign_gguf ...`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __name__ == "__main__":  # run as a script by torchrun: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qrealign_gguf import dist  # noqa: E402
from qrealign_gguf.formats.types import qtype  # noqa: E402
from qrealign_gguf.realign.calibrate import RealignSettings, Target, realign_layer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def launch(argv: list[str], limit_s: float, what: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGV` from the repository root, one thread per rank, output
    captured; past limit_s the whole job (torchrun and its workers, its own session) is killed and the test fails."""
    import pytest

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("QREALIGN_DEBUG", None)
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            pytest.fail(f"{what} still running after {limit_s} s: a rank hangs")
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


LINEARS = {"self_attn.q_proj": "Q4_0", "self_attn.k_proj": "Q4_0", "self_attn.v_proj": "Q4_1",
           "self_attn.o_proj": "Q4_0", "mlp.gate_proj": "Q4_1", "mlp.up_proj": "Q5_0", "mlp.down_proj": "Q4_0"}
SETTINGS = RealignSettings(iters=12, batch=4, harm_weight=1.0, n_benign=12, n_harmful=10)


def problem(seed: int = 0, n_benign: int = 12, n_harmful: int = 10):  # noqa: ANN201
    """(layer, targets, benign (X, Y, kwargs), harmful (X, kwargs), score, margin, ceiling): decoder layer 0 of a
    tiny random llama on random prompts of 4..19 tokens; a random probe direction calibrated so the harmful
    prompts score about -1 (the target is +1, the benign ceiling 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(seed + 1)
    xs, kws = [], []

    def grab(_m, args, kwargs):  # noqa: ANN001, ANN202
        xs.append(args[0].detach().clone())
        kws.append({k: v for k, v in kwargs.items() if k != "past_key_values"} | {"use_cache": False})

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        for _ in range(n_benign + n_harmful):
            n = int(torch.randint(4, 20, (1,), generator=gen))
            model.model(torch.randint(0, 300, (1, n), generator=gen), use_cache=False)
    h.remove()
    with torch.no_grad():
        outs = [layer(x, **kw) for x, kw in zip(xs, kws)]
    ys = [o[0] if isinstance(o, tuple) else o for o in outs]
    u = torch.randn(64, generator=gen)
    u = u / u.norm()
    proj = torch.stack([y[0, -1] @ u for y in ys[n_benign:]])
    w, b = u / proj.std(), float(-(proj.mean() / proj.std()) - 1.0)
    targets = [Target(m, f"blk.0.{m}.weight", qtype(t)) for m, t in LINEARS.items()]
    benign = (xs[:n_benign], ys[:n_benign], kws[:n_benign])
    harmful = (xs[n_benign:], kws[n_benign:])
    return layer, targets, benign, harmful, (lambda s: s @ w + b), 1.0, 0.0


def realign(world: dist.World | None, settings: RealignSettings = SETTINGS, hook=None):  # noqa: ANN001, ANN201
    """realign_layer on this rank's shard of the problem; hook(layer) may instrument the layer first."""
    layer, targets, (xb, yb, kb), (xh, kh), score, margin, ceiling = problem()
    w = world or dist.single()
    if hook is not None:
        hook(layer)
    return realign_layer(layer, targets, (dist.shard(w, xb), dist.shard(w, yb), dist.shard(w, kb)),
                         (dist.shard(w, xh), dist.shard(w, kh)), score, margin, ceiling, settings, 0, world=world)


# a minibatch that splits unevenly over 2 ranks (benign 1 : 4, harmful 2 : 1): local means would weight it wrongly
GRAD_IB, GRAD_IH = [0, 5, 7, 3, 9], [1, 8, 4]


def step_grads(world: dist.World | None) -> tuple[float, dict[str, np.ndarray]]:
    """The loss of minibatch (GRAD_IB, GRAD_IH) at the start encoding and the gradient of every learnable (summed
    over the ranks, as realign_layer sums them before Adam); all three terms on, the distill term towards
    'aligned' states made by perturbing the harmful outputs, its first 2 positions left out."""
    from dataclasses import replace

    from qrealign_gguf.formats import simulate
    from qrealign_gguf.realign.calibrate import AlignedStates, _sum_grads, _weights, initial_encoding, minibatch_loss

    layer, targets, (xb, yb, kb), (xh, kh), score, margin, ceiling = problem()
    w = world or dist.single()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ya = [(lambda o: o[0] if isinstance(o, tuple) else o)(layer(x, **kw)) for x, kw in zip(xh, kh)]
        ya = [y + 0.05 * y.std() * torch.randn(y.shape, generator=gen) for y in ya]
    settings = replace(SETTINGS, distill_weight=0.5)
    base = {t.module: layer.get_submodule(t.module).weight.detach().float() for t in targets}
    learn = {t.module: simulate.init_params(t.qtype, base[t.module], initial_encoding(t, base[t.module]))
             for t in targets}
    groups = [g for t in targets for g in learn[t.module].param_groups()]
    for p in layer.parameters():
        p.requires_grad_(False)
    loss = minibatch_loss(layer, _weights(layer, targets, learn, base),
                          (dist.shard(w, xb), dist.shard(w, yb), dist.shard(w, kb)),
                          (dist.shard(w, xh), dist.shard(w, kh), AlignedStates(dist.shard(w, ya), skip=2)),
                          GRAD_IB, GRAD_IH, score, margin, ceiling, settings, w)
    if torch.is_tensor(loss):
        loss.backward()
    _sum_grads(w, groups)
    value = dist.sum_floats(w, [loss.item() if torch.is_tensor(loss) else loss])[0]
    grads = {f"{m}.{k}": p.grad.numpy().copy() for m, lr in learn.items() for k, p in enumerate(lr.parameters())
             if p.grad is not None}
    return value, grads


def save_realign(out: Path, rank: int, result) -> None:  # noqa: ANN001
    packed, _, stats = result
    np.savez(out / f"realign.rank{rank}.npz", **packed)
    d = {k: v for k, v in vars(stats).items() if k != "seconds"}
    (out / f"realign.rank{rank}.json").write_text(json.dumps(d))


def equalize_scales(world: dist.World | None):  # noqa: ANN201
    from qrealign_gguf.realign import equalize

    layer, targets, (xb, _, kb), _, _, _, _ = problem()
    w = world or dist.single()
    xs, ks = dist.shard(w, xb), dist.shard(w, kb)

    def run() -> None:
        for x, kw in zip(xs, ks):
            layer(x, **kw)

    enc = {t.module: (t.qtype, None) for t in targets}
    return equalize.choose(layer, run, enc, n_heads=4, n_kv=2, world=world)


def _collectives(world: dist.World) -> dict:
    r, n = world.rank, world.size
    t = torch.full((3,), float(r + 1))
    rows = torch.arange((r + 1) * 2, dtype=torch.float32).reshape(r + 1, 2) + 100 * r  # rank r: r + 1 rows
    mine = torch.tensor([[float(i)] for i in dist.shard_indices(world, 7)])
    arrays = dist.broadcast_arrays(world, {"a": np.arange(5, dtype=np.int16)} if r == 0 else None)
    dist.check_same(world, {"outtype": "Q4_0", "model": "m"})
    dist.barrier(world)
    return {
        "shard": dist.shard(world, list("abcdefg")),
        "local_part": dist.local_part(world, [6, 1, 4, 3, 0]),
        "total": dist.shard_total(world, len(dist.shard_indices(world, 7))),
        "reduced": dist.all_reduce_sum_(world, t).tolist(),
        "floats": dist.sum_floats(world, [0.1 * (r + 1), 1e16 if r == 0 else 1.0]),
        "rows": [p.tolist() for p in dist.all_gather_rows(world, rows)],
        "unshard": dist.unshard(world, mine, 7)[:, 0].tolist(),
        "bytes": [b.decode() for b in dist.gather_bytes(world, f"r{r}".encode() * (r + 1))],
        "bcast": dist.broadcast_bytes(world, b"from zero" if r == 0 else None).decode(),
        "arrays": {k: v.tolist() for k, v in arrays.items()},
        "agree": dist.agree(world, lambda: r * 10),
        "size": n,
    }


def _die_at(rank: int, call: int, action: str):  # noqa: ANN201
    """A forward hook for rank `rank`'s layer: at its `call`-th forward (mid-optimization), SIGKILL itself or hang."""
    def install(layer: torch.nn.Module) -> None:
        count = [0]

        def fn(*_: object) -> None:
            count[0] += 1
            if count[0] == call:
                if action == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)  # "hang": alive, holding its sockets, never answering

        if int(os.environ["RANK"]) == rank:
            layer.register_forward_pre_hook(fn)
    return install


def main(argv: list[str]) -> None:
    import typer

    from qrealign_gguf.cli.common import run_guarded

    torch.set_num_threads(1)
    scenario, out = argv[0], Path(argv[1])
    timeout = float(argv[2]) if len(argv) > 2 else dist.DEFAULT_TIMEOUT_S

    def work() -> None:
        with dist.session("cpu", timeout) as world:
            r = world.rank
            if scenario in ("collectives", "all"):
                (out / f"collectives.rank{r}.json").write_text(json.dumps(_collectives(world)))
            if scenario in ("grad", "all"):
                value, grads = step_grads(world)
                np.savez(out / f"grad.rank{r}.npz", loss=np.float64(value), **grads)
            if scenario in ("equalize", "all"):
                scales, _ = equalize_scales(world)
                np.savez(out / f"equalize.rank{r}.npz", **vars(scales))
            if scenario in ("realign", "all"):
                save_realign(out, r, realign(world))
            if scenario in ("die", "hang"):
                realign(world, hook=_die_at(1, 6, scenario))
                (out / f"rank{world.rank}.done").write_text("finished?")  # must never happen
            if scenario not in ("all", "collectives", "grad", "equalize", "realign", "die", "hang"):
                raise SystemExit(f"unknown scenario {scenario}")

    try:
        run_guarded(work)
    except typer.Exit as e:  # what typer does for the real CLI: the code run_guarded chose
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main(sys.argv[1:])
