"""simulate.py (torch) against the native codec, bit for bit.

dequant: equals codec.dequantize on encoder output and on arbitrary packed codes.
init_params + fake_quant at the start: equals the native encoding's dequantization.
export after any change of the learnables: pack -> native dequantize equals fake_quant's forward.
Gradients reach every learnable; a short Adam run lowers an output-reconstruction error below RTN.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qrealign_gguf.formats import codec, simulate as sim
from qrealign_gguf.formats.types import qtype

from conftest import adversarial_rows

TYPES = list(sim.FORMATS)
COLS = 512  # a multiple of both 32 and 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add contention (seconds per test on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _require(name: str) -> None:
    """Skip a type whose native encoder does not exist yet (the K-quants arrived after the legacy ones)."""
    t = qtype(name)
    try:
        codec.quantize(np.ones((1, t.block_size), np.float32), t)
    except ValueError as exc:
        pytest.skip(f"native codec cannot encode {name} yet ({exc})")


def _weights(cols: int, seed: int, extremes: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [
        adversarial_rows(cols, rng),  # zeros, constants, outliers, denormals, huge / tiny magnitudes
        rng.standard_normal((4, cols)) * 0.05,
        rng.standard_t(2, (8, cols)) * 0.02 * rng.uniform(0.2, 3, (8, 1)),  # heavy tails
        rng.integers(-40, 40, (2, cols)) / 4,  # exact ties
    ]
    if extremes:  # fp16-overflowing scales, inf/nan results
        x = rng.standard_normal((3, cols))
        x[0] *= 1e6
        x[1, ::3] = 3.4e38
        x[2, 1::2] = -0.0
        parts.append(x)
    return np.concatenate(parts).astype(np.float32)


def _imatrix(cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.lognormal(0.0, 1.5, cols) * np.where(rng.random(cols) < 0.02, 50.0, 1.0)).astype(np.float32)


def _same(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, what: str) -> None:
    """Bit-identical float32, except that any NaN matches any NaN (their payload is the hardware's)."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32, what
    nan = np.isnan(a)
    assert np.array_equal(nan, np.isnan(b)), f"{what}: NaN positions differ"
    diff = np.argwhere((a.view(np.int32) != b.view(np.int32)) & ~nan)
    assert diff.size == 0, f"{what}: {len(diff)} differ, first at {tuple(diff[0])}: {a[tuple(diff[0])]!r} vs {b[tuple(diff[0])]!r}"


def _perturb(L: sim.Learn, seed: int) -> None:
    """Move every learnable, beyond its range too (fake_quant clamps, export must follow)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t, lo, hi: (torch.rand(t.shape, generator=g) * (hi - lo) + lo).to(t.device)  # noqa: E731
    with torch.no_grad():
        L.v.copy_(rnd(L.v, -0.8, 0.8))
        for m in (L.d_mul, L.m_mul):
            if m is not None:
                m.copy_(rnd(m, 0.4, 1.6))
        for o in (L.sc_off, L.mn_off):
            if o is not None:
                o.copy_(rnd(o, -6, 6))


@pytest.mark.parametrize("name", TYPES)
def test_dequant_of_encoder_output(name: str) -> None:
    _require(name)
    cols = COLS
    x = _weights(cols, 1, extremes=True)
    for im in (None, _imatrix(cols, 2)):
        packed = codec.quantize(x, name, im)
        y = sim.dequant(name, sim.to_torch(codec.unpack(packed, name, cols)))
        _same(y, codec.dequantize(packed, name, cols), f"{name} imatrix={im is not None}")


@pytest.mark.parametrize("name", TYPES)
def test_dequant_of_arbitrary_codes(name: str) -> None:
    """Every code of every field, random fp16 scales (signs, zeros, subnormals): packed by the codec."""
    _require(name)
    t, f, cols, rows = qtype(name), sim.FORMATS[name], 512, 8
    rng = np.random.default_rng(3)
    nb = cols // t.block_size

    def codes(lo: int, hi: int, off: int, shape: tuple) -> np.ndarray:
        return ((rng.integers(lo, hi + 1, shape) + off) % 256).astype(np.uint8)

    def f16(shape: tuple) -> np.ndarray:
        v = rng.standard_normal(shape) * 10.0 ** rng.integers(-9, 3, shape)
        v[rng.random(shape) < 0.05] = 0.0
        return v.astype(np.float16)

    sub = (rows, nb, t.nsub)
    p = codec.BlockParams(q=codes(f.lo, f.hi, f.qoff, (rows, cols)), d=f16((rows, nb)),
                          dmin=f16((rows, nb)) if t.has_min else None,
                          sc=codes(f.sc_lo, f.sc_hi, f.sc_off, sub) if t.nsub else None,
                          mn=codes(0, f.mn_hi, 0, sub) if f.mn_hi else None)
    if t.n_outliers:  # QR4_KO: random increasing positions, random fp16 values (incl. inf / nan)
        n = t.n_outliers
        p.oidx = np.sort(np.stack([[rng.choice(t.block_size, n, replace=False) for _ in range(nb)] for _ in range(rows)]),
                         axis=-1).astype(np.uint8)
        p.oval = f16((rows, nb, n))
        p.oval[0, 0, :2] = [np.inf, np.nan]
    packed = codec.pack(name, p)
    _same(sim.dequant(name, sim.to_torch(p)), codec.dequantize(packed, name, cols), name)


@pytest.mark.parametrize("name", TYPES)
def test_start_is_the_native_encoding(name: str) -> None:
    _require(name)
    cols = COLS
    x = _weights(cols, 4, extremes=True)
    for im in (None, _imatrix(cols, 5)):
        packed = codec.quantize(x, name, im)
        for L in (sim.init_params(name, torch.from_numpy(x), packed), sim.init_params(name, x, imatrix=im)):
            w_hat = sim.fake_quant(name, torch.from_numpy(x), L)
            _same(w_hat, codec.dequantize(packed, name, cols), f"{name} imatrix={im is not None}")
            bp = sim.export(name, torch.from_numpy(x), L)
            assert codec.pack(name, bp).tobytes() == packed.tobytes(), f"{name}: export of the start re-encodes"


@pytest.mark.parametrize("name", TYPES)
def test_export_matches_fake_quant(name: str) -> None:
    _require(name)
    cols = COLS
    x = torch.from_numpy(_weights(cols, 6))
    for seed, im in ((0, None), (1, _imatrix(cols, 7)), (2, None)):
        L = sim.init_params(name, x, imatrix=im)
        _perturb(L, seed)
        w_hat = sim.fake_quant(name, x, L)
        native = codec.dequantize(codec.pack(name, sim.export(name, x, L)), name, cols)  # pack checks ranges
        _same(w_hat, native, f"{name} seed {seed}")
        assert not torch.equal(w_hat, sim.fake_quant(name, x, sim.init_params(name, x, imatrix=im))), "perturbation had no effect"


@pytest.mark.parametrize("name", TYPES)
def test_gradients_reach_every_learnable(name: str) -> None:
    _require(name)
    cols = COLS
    x = torch.from_numpy(_weights(cols, 8))
    imp = torch.from_numpy(_imatrix(cols, 9))
    L = sim.init_params(name, x)
    _perturb(L, 3)  # off the start, so that min codes and clipped scales move too
    L.project_()
    loss = ((sim.fake_quant(name, x, L) - x) ** 2 * imp).sum()
    loss.backward()
    for label, p in zip(("v", "d_mul", "m_mul", "sc_off", "mn_off"), (L.v, L.d_mul, L.m_mul, L.sc_off, L.mn_off)):
        if p is None:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name} {label}: no or non-finite gradient"
        assert (p.grad != 0).float().mean() > 0.3, f"{name} {label}: gradient mostly zero"


def _reference_round(W, v, S, B, g, st):  # noqa: ANN001, ANN202
    """simulate_grad's formulation in plain autograd (what simulate.py computed before the Function): the
    oracle for the Function's hand-written backward."""
    tab = None if g.table is None else torch.tensor(g.table, dtype=torch.float32)
    idx = torch.arange(16, dtype=torch.float32)

    def interp(x, xk, yk):  # noqa: ANN001, ANN202
        i = (torch.searchsorted(xk, x.detach().contiguous()) - 1).clamp(0, xk.numel() - 2)
        return yk[i] + (x - xk[i]) * ((yk[i + 1] - yk[i]) / (xk[i + 1] - xk[i]))

    def target(b, s):  # noqa: ANN001, ANN202
        p = (W if b is None else W - b) / s
        return p if tab is None else interp(p, tab, idx)

    Sd = torch.where(S == 0, torch.ones_like(S), S)
    p = target(B, Sd)
    q0 = st.q0.float()
    with torch.no_grad():
        p0 = torch.where(st.live0, target(st.b0, st.s0), torch.zeros_like(p))
        z0 = q0 + torch.nan_to_num(p0 - q0).clamp(-sim.RESIDUAL, sim.RESIDUAL)
    z = torch.where(st.live0, z0 + (p - p0), p) + v.clamp(-sim.V_RANGE, sim.V_RANGE)
    z = torch.where((S == 0) | torch.isnan(z), q0, z)
    level = sim._round(z, g.lo, g.hi)
    value = level if tab is None else sim._ste(tab[level.detach().long()], interp(z.clamp(g.lo, g.hi), idx, tab))
    return S * value if B is None else S * value + B


@pytest.mark.parametrize("name", TYPES)
def test_rounder_gradients_equal_plain_autograd(name: str) -> None:
    """The rounding Function saves one int8 level and one flag per weight and recomputes the rest in its
    backward pass; its forward and its gradients in v, S and B must be autograd's for the same formulation."""
    _require(name)
    x = torch.from_numpy(_weights(COLS, 12))
    qt, f = sim._info(name)
    L = sim.init_params(name, x)
    _perturb(L, 5)
    L.project_()
    with torch.no_grad():
        S, B = sim.FAMILIES[f.family](f, *sim._scales(f, L))
    Wb = sim._blocks(x, qt)
    v = torch.rand(L.v.shape, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8  # beyond V_RANGE too
    upstream = torch.randn(Wb.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda *a: sim.round_blocks(*a)[0], _reference_round):
        leaves = [v.clone().requires_grad_(), S.clone().requires_grad_(),
                  None if B is None else B.clone().requires_grad_()]
        w = fn(Wb, leaves[0], leaves[1], leaves[2], sim._grid(f), L.start)
        (w * upstream).nan_to_num(0.0).sum().backward()
        grads.append((w.detach(), *(t.grad for t in leaves if t is not None)))
    _same(grads[0][0], grads[1][0], f"{name} forward")
    for label, a, b in zip(("dv", "dS", "dB"), grads[0][1:], grads[1][1:]):
        ok = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), ok), f"{name} {label}: non-finite positions differ"
        assert torch.allclose(a[ok], b[ok], rtol=1e-5, atol=1e-6 * float(b[ok].abs().max().clamp(min=1))), \
            f"{name} {label}: max diff {float((a[ok] - b[ok]).abs().max())}"


def _reconstruction_setup(name: str):
    torch.manual_seed(0)
    cols = 256 if qtype(name).nsub else 64  # nn.Linear(64, 32); K-quants need a 256-wide row
    W = torch.nn.Linear(cols, 32).weight.detach().clone()
    imp = torch.exp(torch.randn(cols))  # per-input-channel mean square activation (imatrix-like)
    Z = torch.randn(256, cols)
    X = (Z + Z @ torch.randn(cols, cols) / cols**0.5) * imp.sqrt()  # correlated channels, as in real activations
    return W, X, imp


@pytest.mark.parametrize("name", TYPES)
def test_short_optimization_beats_rtn(name: str) -> None:
    """Adam on ||X W_hat^T - X W^T||^2, auto-round style (linear lr decay, best iterate kept)."""
    _require(name)
    W, X, _ = _reconstruction_setup(name)
    Y = X @ W.T
    L = sim.init_params(name, W)
    err = lambda w_hat: ((X @ w_hat.T - Y) ** 2).mean()  # noqa: E731
    with torch.no_grad():
        rtn = err(torch.from_numpy(codec.dequantize(codec.quantize(W.numpy(), name), name, W.shape[1]))).item()
    steps = 40
    opt = torch.optim.Adam(L.param_groups(lr=5e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    best, best_state = float("inf"), None
    for _ in range(steps):
        loss = err(sim.fake_quant(name, W, L))
        if loss.item() < best:
            best, best_state = loss.item(), [p.detach().clone() for p in L.parameters()]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        L.project_()
    with torch.no_grad():
        for p, b in zip(L.parameters(), best_state):
            p.copy_(b)
        w_hat = sim.fake_quant(name, W, L)
    native = torch.from_numpy(codec.dequantize(codec.pack(name, sim.export(name, W, L)), name, W.shape[1]))
    _same(w_hat, native, name)
    final = err(native).item()
    assert final < rtn, f"{name}: {final} >= RTN {rtn}"  # seed 0 gives 0.74..0.94 of RTN


def test_iq4nl_fractional_index_rounds_to_nearest_entry() -> None:
    tab = torch.tensor(sim.IQ4NL_VALUES, dtype=torch.float32)
    y = torch.linspace(-140, 130, 10001)
    idx = sim._target(sim.FORMATS["IQ4_NL"], y, torch.ones(()), None)
    nearest = (y[:, None] - tab).abs().argmin(dim=1)  # exact midpoints may go either way
    dist = (y[:, None] - tab).abs()
    ok = (torch.round(idx).clamp(0, 15).long() == nearest) | (dist.min(1).values == dist.sort(1).values[:, 1])
    assert ok.all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TYPES)
def test_cuda_is_bit_identical(name: str) -> None:
    _require(name)
    cols = COLS
    x = _weights(cols, 10)
    packed = codec.quantize(x, name)
    ref = codec.dequantize(packed, name, cols)
    _same(sim.dequant(name, sim.to_torch(codec.unpack(packed, name, cols), "cuda")), ref, f"{name} dequant")
    xc = torch.from_numpy(x).cuda()
    L = sim.init_params(name, xc, packed)
    _same(sim.fake_quant(name, xc, L), ref, f"{name} start")
    _perturb(L, 4)
    w_hat = sim.fake_quant(name, xc, L)
    _same(w_hat, codec.dequantize(codec.pack(name, sim.export(name, xc, L)), name, cols), f"{name} export")
    ((w_hat - xc) ** 2).sum().backward()
    assert torch.isfinite(L.v.grad).all()


def test_qr4ko_outliers_stay_fixed() -> None:
    """QR4_KO realigns its Q4_K part only: after any move of the learnables the outliers are the encoder's,
    exported unchanged, and take no gradient; fake_quant still equals the C decoder bit for bit."""
    name, cols = "QR4_KO", COLS
    x = torch.from_numpy(_weights(cols, 12))
    im = _imatrix(cols, 13)
    packed = codec.quantize(x.numpy(), name, im)
    start = codec.unpack(packed, name, cols)
    L = sim.init_params(name, x, packed)
    _perturb(L, 4)
    w_hat = sim.fake_quant(name, x, L)
    bp = sim.export(name, x, L)
    np.testing.assert_array_equal(bp.oidx, start.oidx)
    np.testing.assert_array_equal(bp.oval.view(np.uint16), start.oval.view(np.uint16))
    _same(w_hat, codec.dequantize(codec.pack(name, bp), name, cols), name)
    # the outlier positions carry the fp16 values, whatever the Q4_K part does
    rows, nb = x.shape[0], cols // 256
    pos = (torch.from_numpy(start.oidx).long() + torch.arange(nb).view(1, nb, 1) * 256).reshape(rows, -1)
    assert torch.equal(w_hat.gather(1, pos), torch.from_numpy(start.oval.astype(np.float32)).reshape(rows, -1))
    w_hat.sum().backward()
    vg = L.v.grad.reshape(rows, -1).gather(1, pos)
    assert torch.all(vg == 0)
