"""The compiled CPU selective scan against the reference loop (`sequential_scan`, autograd).

The kernel is built on first use (about a minute the first time, then cached); a failed build fails these tests
rather than skipping them (only an explicit ADAMBA_SCAN_KERNEL=0 skips).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from adamba.model import scan_cpu
from adamba.model.scan import sequential_scan

NAMES = ("x", "dt", "A", "B", "C", "D", "h0")
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}

# batch, L, d_inner, N; chunk = the kernel's checkpoint interval (default 64). d_inner 17..20 leaves a partial
# channel block (blocks are 16 channels), L 150 a partial last chunk.
CASES = {
    "L=1": dict(batch=2, L=1, d_inner=5, N=4),
    "L=150 (not a multiple of 64)": dict(batch=2, L=150, d_inner=20, N=6),
    "L=45, chunk 8": dict(batch=3, L=45, d_inner=17, N=3, chunk=8),
    "no h0": dict(batch=2, L=70, d_inner=7, N=5, h0=False),
    "extreme dt, A": dict(batch=2, L=90, d_inner=18, N=5, dt_max=20.0, a_min=-50.0),
    "L=4096": dict(batch=1, L=4096, d_inner=3, N=4),
}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (float64)."""
    scale = ref.abs().max().item()
    return (got.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if scan_cpu.disabled_by_env():  # the user turned the kernel off on purpose; the fallback is tested elsewhere
        pytest.skip(scan_cpu.unavailable_reason())
    assert scan_cpu.available(), f"the compiled CPU selective scan did not build: {scan_cpu.unavailable_reason()}"


def make_inputs(batch, L, d_inner, N, h0=True, dt_max=1.0, a_min=-4.0, seed=0, **_):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(batch, L, d_inner, **f64)
    dt = torch.rand(batch, L, d_inner, **f64) * dt_max + 1e-3
    A = torch.rand(d_inner, N, **f64) * a_min - 0.01
    B, C = torch.randn(batch, L, N, **f64), torch.randn(batch, L, N, **f64)
    D = torch.randn(d_inner, **f64)
    h = torch.randn(batch, d_inner, N, **f64) if h0 else None
    gy, gh = torch.randn(batch, L, d_inner, **f64), torch.randn(batch, d_inner, N, **f64)
    return [x, dt, A, B, C, D, h], gy, gh


def outputs_and_grads(fn, inputs, gy, gh, through_y=True, **kwargs):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y, h = fn(*leaves, **kwargs)
    loss = (h * gh.to(h.dtype)).sum() + ((y * gy.to(y.dtype)).sum() if through_y else 0.0)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, present, allow_unused=True)  # C, D are unused through h_L alone
    grads = iter(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, present, strict=True))
    return y.detach(), h.detach(), [next(grads) if t is not None else None for t in leaves]


@functools.cache
def reference(case: str, through_y: bool = True):
    inputs, gy, gh = make_inputs(**CASES[case])
    return inputs, gy, gh, outputs_and_grads(sequential_scan, inputs, gy, gh, through_y)


def assert_close(got, ref, dtype, what=""):
    y, h, grads = got
    y_ref, h_ref, grads_ref = ref
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and h.dtype == dtype
    errors = {"y": rel_err(y, y_ref), "h_L": rel_err(h, h_ref)}
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert g.dtype == dtype
            errors[f"d{name}"] = rel_err(g, g_ref)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tol}
    assert not bad, f"{what} {dtype}: relative errors above {tol:g}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_all_gradients(case, dtype):
    inputs, gy, gh, ref = reference(case)
    cast = [t.to(dtype) if t is not None else None for t in inputs]
    chunk = CASES[case].get("chunk", scan_cpu.DEFAULT_CHUNK)
    got = outputs_and_grads(scan_cpu.cpu_selective_scan, cast, gy, gh, chunk=chunk)
    assert_close(got, ref, dtype, case)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_gradient_only_through_final_state(dtype):
    case = "L=150 (not a multiple of 64)"
    inputs, gy, gh, ref = reference(case, through_y=False)
    cast = [t.to(dtype) for t in inputs]
    got = outputs_and_grads(scan_cpu.cpu_selective_scan, cast, gy, gh, through_y=False)
    assert_close(got, ref, dtype, "through h_L only")


def test_several_threads_and_channel_groups():
    """2 threads, batch 1, 3 channel blocks: the dB/dC partial sums come from several channel groups."""
    inputs, gy, gh = make_inputs(batch=1, L=80, d_inner=40, N=4, seed=3)
    ref = outputs_and_grads(sequential_scan, inputs, gy, gh)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = outputs_and_grads(scan_cpu.cpu_selective_scan, inputs, gy, gh, chunk=16)
    finally:
        torch.set_num_threads(threads)
    assert_close(got, ref, torch.float64, "2 threads")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, d_inner, threads", [(1, 5, 1), (3, 40, 1), (64, 48, 2)])
def test_decoding_step_against_one_step_of_the_reference(dtype, batch, d_inner, threads):
    """scan_step = one step of sequential_scan times silu(z), in place on the state; B, C and z are views into
    wider projection outputs as in Mamba.step; 64 x 48 rows with 2 threads splits the rows into tasks."""
    [x, dt, A, B, C, D, h], _, _ = make_inputs(batch=batch, L=1, d_inner=d_inner, N=6, seed=4)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(batch, 2 * d_inner, dtype=torch.float64, generator=gen)[:, d_inner:]  # as in_proj(u).chunk(2)
    bc = torch.cat([torch.randn(batch, 1, 3, dtype=torch.float64, generator=gen), B, C], -1)[:, 0]  # as x_proj(x).split
    y_ref, h_ref = sequential_scan(x, dt, A, B, C, D, h)
    y_ref = y_ref[:, 0] * z * torch.sigmoid(z)
    cast = [t.to(dtype) for t in (x[:, 0].contiguous(), dt[:, 0].contiguous(), z, A, bc[:, 3:9], bc[:, 9:], D)]
    state = h.to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = scan_cpu.scan_step(*cast, state)
    finally:
        torch.set_num_threads(previous)
    assert rel_err(y, y_ref) <= TOLERANCE[dtype] and rel_err(state, h_ref) <= TOLERANCE[dtype]
    # inputs it cannot take (mixed dtypes) are declined, for the caller's PyTorch form
    assert scan_cpu.scan_step(cast[0].to(torch.float16), *cast[1:], state) is None


def test_no_grad_partial_grad_and_empty():
    inputs, gy, gh = make_inputs(batch=2, L=20, d_inner=6, N=3, seed=1)
    x, dt, A, B, C, D, h0 = inputs
    y_ref, h_ref = sequential_scan(*inputs)
    with torch.no_grad():
        y, h = scan_cpu.cpu_selective_scan(*inputs)
    assert rel_err(y, y_ref) <= 1e-9 and rel_err(h, h_ref) <= 1e-9
    # only x requires grad; the others get none
    xg = x.clone().requires_grad_()
    y, h = scan_cpu.cpu_selective_scan(xg, dt, A, B, C, D, h0)
    (y * gy).sum().backward()
    xr = x.clone().requires_grad_()
    (sequential_scan(xr, dt, A, B, C, D, h0)[0] * gy).sum().backward()
    assert rel_err(xg.grad, xr.grad) <= 1e-9
    # non-contiguous inputs are made contiguous
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert rel_err(scan_cpu.cpu_selective_scan(xt, dt, A, B, C, D, h0)[0], y_ref) <= 1e-9
    # L = 0
    y0, h0_out = scan_cpu.cpu_selective_scan(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], D, h0)
    assert y0.shape == (2, 0, 6) and torch.equal(h0_out, h0)


def test_env_var_disables(monkeypatch):
    monkeypatch.setattr(scan_cpu, "_module", None)  # forget the cached build (restored after the test)
    monkeypatch.setattr(scan_cpu, "_error", None)
    monkeypatch.setenv("ADAMBA_SCAN_KERNEL", "0")
    assert scan_cpu.available() is False
    assert "ADAMBA_SCAN_KERNEL" in scan_cpu.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        scan_cpu.cpu_selective_scan(*make_inputs(batch=1, L=2, d_inner=2, N=2)[0])


def test_build_failure_warns_once_and_stays_unavailable(monkeypatch):
    import torch.utils.cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(scan_cpu, "_module", None)
    monkeypatch.setattr(scan_cpu, "_error", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    with pytest.warns(RuntimeWarning, match="Ninja is required"):
        assert scan_cpu.available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert scan_cpu.available() is False
