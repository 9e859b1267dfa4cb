"""adamba's Muon off CUDA: torch's update, with the Newton-Schulz iteration in float32 instead of bfloat16."""

import math

import torch

from adamba.train.optim import Muon

COEFFS = (3.4445, -4.775, 2.0315)  # torch's defaults, the quintic of Jordan et al. 2024


def reference_step(param, grad, buf, lr, momentum, weight_decay):
    """One Muon step in float64, written from the update rule: B <- mu B + (1 - mu) g (torch's lerp form),
    nesterov U = (1 - mu) g + mu B, five quintic steps on U / |U|_F in the wide orientation, decay, then
    theta <- theta - lr sqrt(max(1, rows/cols)) NS(U)."""
    param, grad, buf = param.double(), grad.double(), buf.double()
    buf = momentum * buf + (1 - momentum) * grad
    u = (1 - momentum) * grad + momentum * buf
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / torch.linalg.norm(x)
    a, b, c = COEFFS
    for _ in range(5):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    x = x.T if u.shape[0] > u.shape[1] else x
    scale = math.sqrt(max(1.0, param.shape[0] / param.shape[1]))
    return param * (1 - lr * weight_decay) - lr * scale * x, buf


def test_cpu_step_matches_a_float64_reference_and_torch_bf16_muon():
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 96), (64, 64)]  # tall, wide, square
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = Muon(params, lr=0.02, momentum=0.9, weight_decay=0.1, adjust_lr_fn="original")
    theirs = torch.optim.Muon(twins, lr=0.02, momentum=0.9, weight_decay=0.1, adjust_lr_fn="original")
    expected = [p.detach().double() for p in params]
    buffers = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for i, g in enumerate(grads):
            expected[i], buffers[i] = reference_step(expected[i], g, buffers[i], 0.02, 0.9, 0.1)
    for p, q, e in zip(params, twins, expected, strict=True):
        torch.testing.assert_close(p.detach().double(), e, atol=2e-6, rtol=0)  # float32 vs float64
        # torch's iteration in bf16 lands within bf16 rounding of the same point (3 steps x lr x 2^-7 x ~1.5)
        assert (p - q).abs().max().item() < 3 * 0.02 * 1.5 * 2**-6
        assert (p - q).abs().max().item() > 0  # and really ran the other arithmetic


def test_state_dict_round_trips_with_torch_muon():
    """Checkpoints written by torch's Muon (e.g. on a GPU) resume in ours and vice versa: one state key."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(16, 8))
    torch_muon = torch.optim.Muon([p], lr=0.01)
    p.grad = torch.randn(16, 8)
    torch_muon.step()
    ours = Muon([p], lr=0.01)
    ours.load_state_dict(torch_muon.state_dict())
    buf = ours.state[p]["momentum_buffer"].clone()
    p.grad = torch.randn(16, 8)
    ours.step()
    torch.testing.assert_close(ours.state[p]["momentum_buffer"], buf.lerp(p.grad, 1 - 0.95))
    assert torch.optim.Muon([p], lr=0.01).load_state_dict(ours.state_dict()) is None
