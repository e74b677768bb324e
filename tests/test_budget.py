"""The realignment's memory/time plan (realign/budget.py) against what a real layer takes."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qrealign_gguf.errors import InputError
from qrealign_gguf.realign.budget import Geometry, Speed, Workload, check_fits, estimate, geometry_of

ROOT = Path(__file__).resolve().parents[1]
SPEED = Speed("cpu", matmul_flops=1e10, fake_quant_s_per_weight=1e-7)


def _measure(h: int, i: int, n: int, t: int) -> tuple[int, int]:
    """(realigned weights, peak RSS growth in bytes) of realign_layer on a synthetic qwen2 layer, own process."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "realign_layer_memory.py"), str(h), str(i),
                        str(n), str(t), "8", "2", "Q4_K"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"W=(\d+) .*delta=(\d+)MiB", r.stdout)
    assert m, r.stdout
    return int(m.group(1)), int(m.group(2)) << 20


def test_layer_estimate_covers_a_measured_layer_without_gross_overstatement():
    """The per-weight constant must bound what realign_layer really allocates (a plan that says "fits" and then
    runs out of memory hours later is the failure to avoid), and not overstate it more than 3x."""
    h, i = 256, 1024
    weights, grown = _measure(h, i, 4, 32)
    g = Geometry(hidden=h, intermediate=i, heads=4, n_layers=1, layer_weights=weights)
    b = estimate(g, Workload(4, 4, 32, 32, 8, 2), SPEED)
    assert grown <= b.parts["layer"] + b.parts["batch"] + b.parts["streams"] <= 3 * grown


def test_memory_grows_with_the_layer_not_the_depth_and_ranks_share_the_prompts():
    g = Geometry(hidden=1024, intermediate=4096, heads=16, n_layers=8, layer_weights=16 << 20)
    w = Workload(64, 64, 60, 128, 8, 40)
    deep = Geometry(**{**g.__dict__, "n_layers": 80})
    assert estimate(deep, w, SPEED).total_bytes == estimate(g, w, SPEED).total_bytes
    assert estimate(deep, w, SPEED).total_seconds == pytest.approx(10 * estimate(g, w, SPEED).total_seconds)
    two = estimate(g, Workload(64, 64, 60, 128, 8, 40, ranks=2), SPEED)
    one = estimate(g, w, SPEED)
    assert two.parts["streams"] * 2 == pytest.approx(one.parts["streams"], rel=1e-6)
    assert two.parts["layer"] == one.parts["layer"]  # every rank optimizes the whole layer
    assert one.seconds_per_layer / 2 < two.seconds_per_layer < one.seconds_per_layer
    off = estimate(g, Workload(64, 64, 60, 128, 8, 40, offload=True), SPEED)
    assert off.parts["streams"] < one.parts["streams"]


def test_a_plan_that_does_not_fit_stops_with_the_numbers_and_a_way_out():
    g = Geometry(hidden=4096, intermediate=14336, heads=32, n_layers=32, layer_weights=218_103_808)
    w = Workload(32, 32, 60, 128, 8, 40)
    b = estimate(g, w, SPEED)
    check_fits(b, w, b.total_bytes, "the host")  # exactly enough is enough
    with pytest.raises(InputError, match=r"needs ~\d+\.\d GiB on the host .* but 8\.0 GiB is available; try .*more memory"):
        check_fits(b, w, 8 << 30, "the host")


def test_geometry_comes_from_the_plan(tmp_path):
    from tiny_models import make_tiny_llama

    from qrealign_gguf.api import ConvertJob, plan_conversion

    d = make_tiny_llama(tmp_path / "m", hidden=64, inter=128, layers=3)
    plan = plan_conversion(ConvertJob(model=d, output=tmp_path / "x.gguf", outtype="Q8_0"))
    g = geometry_of(plan)
    # q, k, v, o, gate, up, down of one layer; kv heads 2 of 4 (head dim 16): k and v are 32 x 64
    assert (g.hidden, g.intermediate, g.heads, g.n_layers) == (64, 128, 4, 3)
    assert g.layer_weights == 64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128
