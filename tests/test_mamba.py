import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from adamba import AdambaLM, TrainConfig
from adamba.model.cache import InferenceCache
from adamba.model.mamba import Mamba
from adamba.train.optim import build_optimizers


def reference_causal_conv_silu(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """silu of the depthwise causal conv of x (L, channels), one output and one tap at a time, zero history."""
    weight, d_conv = sd["conv1d.weight"][:, 0], sd["conv1d.weight"].shape[-1]
    conv = torch.zeros_like(x)
    for t in range(x.size(0)):
        for k in range(d_conv):  # tap k sees input t - (d_conv - 1 - k)
            s = t - (d_conv - 1 - k)
            if s >= 0:
                conv[t] += weight[:, k] * x[s]
        conv[t] += sd["conv1d.bias"]
    return conv * torch.sigmoid(conv)


def reference_mamba(sd: dict, u: torch.Tensor, d_state: int, dt_rank: int) -> torch.Tensor:
    """The reference Mamba equations in float64, one token and one channel at a time, from a state dict."""
    sd = {k: v.double() for k, v in sd.items()}
    u = u.double()
    batch, L, _ = u.shape
    d_inner = sd["D"].numel()
    A = -torch.exp(sd["A_log"])
    out = torch.zeros(batch, L, sd["out_proj.weight"].shape[0], dtype=torch.float64)
    for b in range(batch):
        xz = u[b] @ sd["in_proj.weight"].T
        x, z = xz[:, :d_inner], xz[:, d_inner:]
        xc = reference_causal_conv_silu(sd, x)
        h = torch.zeros(d_inner, d_state, dtype=torch.float64)
        for t in range(L):
            proj = sd["x_proj.weight"] @ xc[t]
            dt_in, Bt, Ct = proj[:dt_rank], proj[dt_rank:dt_rank + d_state], proj[dt_rank + d_state:]
            dt = torch.log1p(torch.exp(sd["dt_proj.weight"] @ dt_in + sd["dt_proj.bias"]))
            for c in range(d_inner):
                h[c] = torch.exp(dt[c] * A[c]) * h[c] + dt[c] * Bt * xc[t, c]
            y = (h * Ct).sum(-1) + sd["D"] * xc[t]
            y = y * z[t] * torch.sigmoid(z[t])
            out[b, t] = sd["out_proj.weight"] @ y
    return out


@pytest.mark.parametrize("kernel", ["compiled", "pytorch"])
def test_reference_state_dict_loads_and_matches_float64_equations(kernel, monkeypatch):
    """Both sequence paths (the compiled CPU kernel and the PyTorch fallback) against the equations."""
    if kernel == "pytorch":
        monkeypatch.setenv("ADAMBA_SCAN_KERNEL", "0")
    torch.manual_seed(0)
    d_model, d_state, d_conv, expand = 16, 4, 4, 2
    d_inner, dt_rank = expand * d_model, 1
    g = torch.Generator().manual_seed(1)
    state = {  # the reference module's names and shapes
        "in_proj.weight": torch.randn(2 * d_inner, d_model, generator=g) * 0.3,
        "conv1d.weight": torch.randn(d_inner, 1, d_conv, generator=g) * 0.5,
        "conv1d.bias": torch.randn(d_inner, generator=g) * 0.1,
        "x_proj.weight": torch.randn(dt_rank + 2 * d_state, d_inner, generator=g) * 0.3,
        "dt_proj.weight": torch.randn(d_inner, dt_rank, generator=g) * 0.5,
        "dt_proj.bias": torch.randn(d_inner, generator=g) - 3,
        "A_log": torch.log(torch.rand(d_inner, d_state, generator=g) * 4 + 0.5),
        "D": torch.randn(d_inner, generator=g),
        "out_proj.weight": torch.randn(d_model, d_inner, generator=g) * 0.3,
    }
    mixer = Mamba(d_model, d_state, d_conv, expand, dt_rank="auto")
    mixer.load_state_dict(state, strict=True)
    u = torch.randn(2, 11, d_model, generator=g)
    want = reference_mamba(state, u, d_state, dt_rank)
    got = mixer.double()(u.double())
    assert (got - want).abs().max().item() < 1e-10
    from adamba.model import scan_cpu

    assert scan_cpu.available() == (kernel == "compiled")


def test_reference_initialisation():
    m = Mamba(64, d_state=16, expand=2)
    assert m.dt_rank == 4 and m.d_inner == 128
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, -1))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.max() / dt.min() > 10
    assert torch.equal(m.D, torch.ones(128))
    model = AdambaLM.build(tiny_config(block_pattern="TM"))
    assert torch.count_nonzero(model.blocks[1].mixer.out_proj.weight) == 0  # the block starts as the identity
    assert torch.count_nonzero(model.blocks[1].mixer.in_proj.weight) > 0


def random_hybrid(pattern: str, **overrides) -> AdambaLM:
    torch.manual_seed(0)
    model = AdambaLM(tiny_config(block_pattern=pattern, n_layer=len(pattern), **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "dt_proj.bias", "D")):
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("pattern", ["MM", "TMTM", "MTTM"])
@torch.no_grad()
def test_decode_equals_full_forward_for_every_prompt_length(pattern):
    model = random_hybrid(pattern, sequence_len=320, n_kv_head=2, mamba_use_mlp=pattern == "MM")
    seq = torch.randint(0, 512, (1, 304))
    reference = model(seq)
    for prompt_len in range(1, 301, 1 if pattern == "MM" else 13):
        cache = InferenceCache(model, 1, 304)
        torch.testing.assert_close(model(seq[:, :prompt_len], cache=cache), reference[:, :prompt_len],
                                   atol=1e-5, rtol=1e-5)
        for t in range(prompt_len, min(prompt_len + 3, 304)):
            torch.testing.assert_close(model(seq[:, t:t + 1], cache=cache)[:, 0], reference[:, t],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["compiled", "pytorch"])
@torch.no_grad()
def test_decode_steps_equal_full_forward_with_either_step(kernel, monkeypatch):
    """Mamba.step's two forms, the compiled one-pass kernel and the PyTorch equations, batch 3, float64."""
    if kernel == "pytorch":
        monkeypatch.setenv("ADAMBA_SCAN_KERNEL", "0")
    model = random_hybrid("MTM", sequence_len=40).double()
    seq = torch.randint(0, 512, (3, 24))
    reference = model(seq)
    cache = InferenceCache(model, 3, 24)
    model(seq[:, :8], cache=cache)
    for t in range(8, 24):
        torch.testing.assert_close(model(seq[:, t:t + 1], cache=cache)[:, 0], reference[:, t], atol=1e-10, rtol=1e-10)


def test_engine_generates_with_pure_mamba_and_hybrids():
    from adamba.infer.engine import Engine
    from adamba.infer.sampling import SamplingParams

    for pattern in ("MM", "TM"):
        model = random_hybrid(pattern, sequence_len=64)
        rows = Engine(model).generate([[1, 2, 3], [4]], 8, SamplingParams(temperature=0))
        for prompt, row in zip([[1, 2, 3], [4]], rows, strict=True):
            ids = list(prompt)
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            assert row.tokens == ids[len(prompt):]


def assert_no_decay_group(model: AdambaLM, params: list[torch.nn.Parameter]) -> None:
    """`params` are trained by AdamW in one group without weight decay, never by Muon; every parameter is in
    exactly one optimizer."""
    adamw, muon = build_optimizers(model, TrainConfig(weight_decay=0.1))
    no_decay = {id(p) for p in params}
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert not no_decay & muon_params
    for group in adamw.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & no_decay:
            assert ids == no_decay and group["weight_decay"] == 0.0
    every = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())


def test_optimizer_groups_and_flops_count_the_mixer():
    model = AdambaLM.build(tiny_config(block_pattern="TM"))
    mixer = model.blocks[1].mixer
    assert_no_decay_group(model, [mixer.A_log, mixer.D, mixer.dt_proj.bias, mixer.conv1d.bias])
    f = model.count_flops(32)
    matrices = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith("blocks") and p.ndim == 2 and not n.endswith("A_log"))  # A_log is no matmul
    assert f.projections == 2 * matrices
    d_inner, n = 128, 16
    assert f.scan == 2 * d_inner * 4 + 6 * d_inner * n
    assert f.forward == f.projections + f.attention + f.lm_head + f.scan and math.isclose(f.train, 3 * f.forward)
