"""Today's Muon step (train/muon.py) against hand computations: Polar Express's singular-value band, NorMuon's
normalisation, MuonEq, Muon+, cautious weight decay, and one whole step against a float64 reference."""

import math

import numpy as np
import pytest
import torch

from adamba.train.muon import POLAR_EXPRESS, PolarMuon, equilibrate_rows, normuon, polar_express, renormalise


def matrix_with_spectrum(rows: int, cols: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=g, dtype=torch.float64))
    return u @ torch.diag(singular_values) @ v.T


def polar_express_band() -> tuple[float, float]:
    """Where the scalar polynomials send x in [1e-3, 1] / 1.01 (a dense grid in float64): the guarantee for every
    singular value at least 1e-3 of the Frobenius norm."""
    x = np.geomspace(1e-3, 1.0, 100_001) / 1.01
    for a, b, c in POLAR_EXPRESS:
        x = a * x + b * x ** 3 + c * x ** 5
    return float(x.min()), float(x.max())


def test_the_band_is_the_papers_narrow_one():
    low, high = polar_express_band()
    assert 0.85 < low < 0.86 and 1.14 < high < 1.15


@pytest.mark.parametrize(("rows", "cols"), [(48, 96), (96, 48), (64, 64)])
def test_polar_express_singular_values_lie_in_the_band(rows, cols):
    n = min(rows, cols)
    spectrum = torch.logspace(0, -2, n, dtype=torch.float64)
    u = matrix_with_spectrum(rows, cols, spectrum)
    assert spectrum.min() / u.norm() > 1e-3  # inside the range the band is guaranteed for
    low, high = polar_express_band()
    for dtype, slack in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        o = polar_express(u.to(dtype)).double()
        s = torch.linalg.svdvals(o)
        assert low - slack <= s.min() and s.max() <= high + slack, (dtype, s.min(), s.max())
        # the same singular vectors: o ~ U f(S) V^T, so o^T u is symmetric positive semi-definite
        sym = o.T @ u
        torch.testing.assert_close(sym, sym.T, atol=1e-3 * sym.abs().max(), rtol=0)


def test_polar_express_is_the_scalar_polynomial_on_each_singular_value():
    spectrum = torch.tensor([2.0, 1.0, 0.3, 0.05], dtype=torch.float64)
    u = matrix_with_spectrum(6, 10, spectrum)
    x = spectrum / (u.norm() * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        x = a * x + b * x ** 3 + c * x ** 5
    got = torch.linalg.svdvals(polar_express(u))[:4]  # rank 4; the polynomial is not monotone: compare sorted
    torch.testing.assert_close(got, x.sort(descending=True).values, atol=1e-10, rtol=1e-10)


def test_normuon_equals_a_hand_computation():
    o = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [2.0, 2.0, 2.0], [-1.0, 0.5, 0.0]], dtype=torch.float64)
    moment = torch.tensor([[0.5], [0.1], [2.0], [1.0]], dtype=torch.float64)  # (rows, 1): a tall matrix's neurons
    beta2 = 0.75
    want_moment, want = [], []
    for i in range(4):  # by hand, row by row
        mean_square = sum(v * v for v in o[i].tolist()) / 3
        want_moment.append(beta2 * moment[i, 0].item() + (1 - beta2) * mean_square)
        want.append([v / math.sqrt(want_moment[-1]) for v in o[i].tolist()])
    want = torch.tensor(want, dtype=torch.float64)
    want = want * math.sqrt(sum(v * v for v in o.flatten().tolist())) / want.norm()
    got = normuon(o, moment, beta2)
    torch.testing.assert_close(moment[:, 0], torch.tensor(want_moment, dtype=torch.float64))
    torch.testing.assert_close(got, want)
    wide_moment = torch.zeros(1, 4, dtype=torch.float64)  # a wide matrix: one value per column
    normuon(o.T.contiguous(), wide_moment, 0.0)
    torch.testing.assert_close(wide_moment[0], o.square().mean(dim=1))


def test_row_equilibration_and_renormalisation():
    u = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    e = equilibrate_rows(u)
    target = math.sqrt(25 + 1 + 2) / math.sqrt(3)
    torch.testing.assert_close(e.norm(dim=1), torch.full((3,), target, dtype=torch.float64))
    torch.testing.assert_close(e[0] / e[0].norm(), u[0] / 5)  # directions kept
    torch.testing.assert_close(renormalise(u).norm(), torch.tensor(math.sqrt(2), dtype=torch.float64))


def reference_step(w, grad, buf, moment, lr, mu, wd, beta2):
    """One step written out in float64 from the update rule (train/muon.py's docstring), loops where it helps."""
    buf = mu * buf + (1 - mu) * grad
    u = (1 - mu) * grad + mu * buf  # lerp(G, M, mu)
    rows, cols = u.shape
    rms_row = u.norm() / math.sqrt(rows)
    u = torch.stack([u[i] * rms_row / u[i].norm() for i in range(rows)])
    x = u.T if rows > cols else u
    x = x / (x.norm() * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        x = a * x + b * (x @ x.T) @ x + c * (x @ x.T) @ (x @ x.T) @ x
    o = x.T if rows > cols else x
    o = o * math.sqrt(min(rows, cols)) / o.norm()
    per_neuron = o.square().mean(dim=1 if rows >= cols else 0, keepdim=True)
    moment = beta2 * moment + (1 - beta2) * per_neuron
    n = o / moment.sqrt()
    o = n * o.norm() / n.norm()
    scale = lr * math.sqrt(max(1.0, rows / cols))
    mask = (o * w >= 0).double()
    return w - scale * o - scale * wd * w * mask, buf, moment


@pytest.mark.parametrize("shape", [(24, 12), (12, 24)])
def test_two_steps_match_a_float64_reference(shape):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2)]
    p = torch.nn.Parameter(w0.clone())
    opt = PolarMuon([p], lr=0.05, momentum=0.9, weight_decay=0.3, beta2=0.8)
    w, buf = w0.clone(), torch.zeros_like(w0)
    moment = torch.zeros((shape[0], 1) if shape[0] >= shape[1] else (1, shape[1]), dtype=torch.float64)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        w, buf, moment = reference_step(w, grad, buf, moment, 0.05, 0.9, 0.3, 0.8)
    torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(w, w0, atol=1e-2)
    # cautious decay really masks: the full decay would land elsewhere
    p2 = torch.nn.Parameter(w0.clone())
    plain = PolarMuon([p2], lr=0.05, momentum=0.9, weight_decay=0.3, beta2=0.8, cautious=False)
    for grad in grads:
        p2.grad = grad.clone()
        plain.step()
    assert (p2.detach() - p.detach()).abs().max() > 1e-3


def test_resume_from_a_state_dict_is_exact():
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(16, 8, generator=g) for _ in range(4)]
    p, q = (torch.nn.Parameter(torch.ones(16, 8)) for _ in range(2))
    straight = PolarMuon([p], lr=0.02, weight_decay=0.1)
    first = PolarMuon([q], lr=0.02, weight_decay=0.1)
    for i, grad in enumerate(grads):
        p.grad = grad.clone()
        straight.step()
        if i < 2:
            q.grad = grad.clone()
            first.step()
    resumed = PolarMuon([q], lr=0.02, weight_decay=0.1)
    resumed.load_state_dict(first.state_dict())
    for grad in grads[2:]:
        q.grad = grad.clone()
        resumed.step()
    assert torch.equal(p, q)


def test_bad_hyperparameters_name_the_field():
    p = torch.nn.Parameter(torch.ones(4, 4))
    with pytest.raises(ValueError, match="beta2"):
        PolarMuon([p], beta2=1.0)
    with pytest.raises(ValueError, match="ns_steps"):
        PolarMuon([p], ns_steps=6)
    with pytest.raises(ValueError, match="2-D matrices"):
        PolarMuon([torch.nn.Parameter(torch.ones(4))])


def test_training_with_the_polar_step_lowers_val_bpb(corpus_dir, capsys):
    from conftest import tiny_config, tiny_train_config

    from adamba.train.trainer import train

    result = train(tiny_config(), tiny_train_config(corpus_dir, num_iterations=20, eval_every=10, muon="polar",
                                                    weight_decay=0.1, total_batch_size=8 * 32), progress=False)
    assert result.initial_val_bpb > 1.2 * result.final_val_bpb
    assert "Muon: polar (Polar Express, NorMuon beta2=0.9, MuonEq, Muon+, cautious weight decay)" in \
        capsys.readouterr().out
    with pytest.raises(ValueError, match="muon: unknown Muon step 'fancy'"):
        tiny_train_config(corpus_dir, muon="fancy")
