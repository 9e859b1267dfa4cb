"""Today's Muon step (nanochat since March 2026, after modded-nanogpt): Polar Express orthogonalisation, NorMuon's
per-neuron second moment, and optionally MuonEq row equilibration, Muon+ renormalisation and cautious weight decay.

Per matrix parameter W (rows = output neurons), with gradient G:

    M <- lerp(M, G, 1 - mu);  U = lerp(G, M, mu)                      Nesterov momentum, as classic Muon
    U <- U * (||U||_F / sqrt(rows)) / ||U_i||  per row i                MuonEq (Wu et al. 2026): equal row norms
    O = polar_express(U)                                                ~ the orthogonal polar factor of U
    O <- O * sqrt(min(rows, cols)) / ||O||_F                            Muon+ (2026): the norm of an exact one
    O <- NorMuon(O)                                                     Li et al. 2025, below
    W <- W - lr s O - lr s wd W [O * W >= 0]                            cautious weight decay (Liang et al. 2024)

with s = sqrt(max(1, rows / cols)), classic Muon's shape scale. NorMuon keeps, per neuron (per row of a tall or
square matrix, per column of a wide one), an exponential average V of the mean square of O along that neuron,
divides O by sqrt(V), and rescales the result to O's own Frobenius norm: orthogonalisation leaves neurons with
unequal update sizes, NorMuon equalises them while the step's overall size stays Muon's.

Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv:2505.16932) replaces Newton-Schulz's one fixed quintic
with five quintics, each minimax-optimal for where the previous one left the singular values: after scaling by
1.01 ||U||_F every singular value of U lies in (0, 1/1.01], and those at least 1e-3 of the Frobenius norm end in
[0.853, 1.141] (the image of [1e-3, 1] / 1.01 under the composed polynomials; tests/test_muon.py checks it).
The iteration runs in bfloat16 on CUDA (tensor cores) and in float32 elsewhere, as adamba's classic Muon does.
"""

from __future__ import annotations

import math

import torch

from .fsdp import shard_like, whole

# (a, b, c) of each step p(x) = a x + b x^3 + c x^5, for 5 steps, safety factor 2e-2 and cushion 2 (the paper's
# construction for a smallest singular value of 1e-3; the same numbers as nanochat's).
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
SAFETY = 1.01  # the input is scaled to spectral norm < 1 / SAFETY


def polar_express(u: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """~ the orthogonal polar factor of u (2-D), computed in u's dtype: X <- a X + (b A + c A^2) X, A = X X^T, on
    the wide orientation (the smaller Gram matrix)."""
    tall = u.size(0) > u.size(1)
    x = u.T if tall else u
    x = x / (x.norm() * SAFETY + 1e-6)
    for a, b, c in POLAR_EXPRESS[:steps]:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def equilibrate_rows(u: torch.Tensor) -> torch.Tensor:
    """MuonEq: every row rescaled to the root-mean-square row norm ||u||_F / sqrt(rows)."""
    target = u.norm() / math.sqrt(u.size(0))
    return u * (target / u.norm(dim=1, keepdim=True).clamp_min(1e-6))


def renormalise(o: torch.Tensor) -> torch.Tensor:
    """Muon+: Frobenius norm set to sqrt(min(rows, cols)), that of an exactly semi-orthogonal matrix."""
    return o * (math.sqrt(min(o.shape)) / o.norm().clamp_min(1e-6))


def neuron_dim(shape: torch.Size) -> int:
    """The dimension NorMuon averages over: across each row (rows >= cols), else down each column."""
    return 1 if shape[0] >= shape[1] else 0


def normuon(o: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon: `second_moment` (rows, 1) or (1, cols), updated in place, <- lerp(., mean(o^2 per neuron), 1 - beta2);
    returns o / sqrt(second_moment), rescaled to o's Frobenius norm."""
    mean_square = o.square().mean(dim=neuron_dim(o.shape), keepdim=True)
    second_moment.lerp_(mean_square.to(second_moment.dtype), 1 - beta2)
    scaled = o * second_moment.clamp_min(1e-10).rsqrt().to(o.dtype)
    return scaled * (o.norm() / scaled.norm().clamp_min(1e-10))


class PolarMuon(torch.optim.Optimizer):
    """Muon with today's step (module docstring). Per parameter state: momentum_buffer, and with NorMuon
    (beta2 > 0) second_momentum_buffer. Hyperparameters per group: lr, momentum, weight_decay, beta2 (0: no
    NorMuon), equilibrate, renormalise, cautious, ns_steps."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 beta2: float = 0.9, equilibrate: bool = True, renormalise: bool = True, cautious: bool = True,
                 ns_steps: int = 5):
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2: {beta2} must be in [0, 1) (0 turns NorMuon off)")
        if not 1 <= ns_steps <= len(POLAR_EXPRESS):
            raise ValueError(f"ns_steps: {ns_steps} must be 1-{len(POLAR_EXPRESS)} (Polar Express has that many)")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, beta2=beta2,
                                      equilibrate=equilibrate, renormalise=renormalise, cautious=cautious,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"PolarMuon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, self.state[p], group)
        return loss

    def _update(self, p: torch.Tensor, state: dict, group: dict) -> None:
        momentum, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - momentum)
        u = whole(p.grad.lerp(buf, momentum))  # the whole matrix under FSDP (fsdp.py); the update is not elementwise
        compute = torch.bfloat16 if p.is_cuda else torch.float32
        if group["equilibrate"]:
            u = equilibrate_rows(u.float())
        o = polar_express(u.to(compute), group["ns_steps"]).to(p.dtype)
        if group["renormalise"]:
            o = renormalise(o)
        if group["beta2"]:
            if "second_momentum_buffer" not in state:
                shape = (p.size(0), 1) if neuron_dim(p.shape) == 1 else (1, p.size(1))
                state["second_momentum_buffer"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
            o = normuon(o, state["second_momentum_buffer"], group["beta2"])
        o = shard_like(o, p)  # this rank's rows of it (fsdp.py); the rest below is elementwise
        lr = lr * math.sqrt(max(1.0, p.size(0) / p.size(1)))  # classic Muon's shape scale, on the decay too
        if wd:
            decay = p * (o * p >= 0) if group["cautious"] else p
            p.sub_(decay, alpha=lr * wd)
        p.sub_(o, alpha=lr)
