import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from adamba import AdambaLM
from adamba.config import parse_block_pattern
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams
from adamba.model.cache import InferenceCache
from adamba.model.compute import Compute
from adamba.model.mamba2 import Mamba2
from adamba.model.ssd import segsum, ssd_chunked, ssd_sequential
from tests.test_mamba import assert_no_decay_group, reference_causal_conv_silu


def ssd_inputs(batch, L, H, P, G, N, dtype, extreme=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, H, P, generator=g, dtype=dtype)
    dt = torch.rand(batch, L, H, generator=g, dtype=dtype) * 0.2
    A = -(torch.rand(H, generator=g, dtype=dtype) * 15 + 1)
    if extreme:  # steps of 0 (padding), tiny and huge; decays from ~1 (A ~ 0) to exp(-3000) = 0
        dt[:, ::3] = 0.0
        dt[:, 1::5] = 1e-6
        dt[:, 2::7] = 100.0
        A = torch.tensor([-1e-4, -30.0, -1.0, -1e-2][:H], dtype=dtype)
    B = torch.randn(batch, L, G, N, generator=g, dtype=dtype)
    C = torch.randn(batch, L, G, N, generator=g, dtype=dtype)
    D = torch.randn(H, generator=g, dtype=dtype)
    h0 = torch.randn(batch, H, P, N, generator=g, dtype=dtype)
    return [x, dt, A, B, C, D, h0]


def assert_scaled_close(got, want, tol, what):
    """max |got - want| <= tol * max(1, max |want|): a relative bound that stays meaningful near zero."""
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max abs error {err:.3g}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
@pytest.mark.parametrize("L,chunk,G,extreme,initial", [
    (1, 4, 1, False, True),      # a single step
    (11, 4, 2, False, True),     # L not a multiple of the chunk size; two groups of heads
    (32, 8, 1, False, False),    # a whole number of chunks, zero initial state
    (5, 16, 1, False, True),     # shorter than one chunk
    (37, 8, 2, True, True),      # extreme dt and A
], ids=["L1", "ragged", "whole-chunks", "short", "extreme"])
def test_chunked_ssd_equals_sequential_reference_with_gradients(dtype, tol, L, chunk, G, extreme, initial):
    H, P, N = 4, 3, 5
    leaves = [t.requires_grad_() for t in ssd_inputs(2, L, H, P, G, N, dtype, extreme)]
    if not initial:
        leaves[-1] = None
    g = torch.Generator().manual_seed(1)
    gy, gh = torch.randn(2, L, H, P, generator=g, dtype=dtype), torch.randn(2, H, P, N, generator=g, dtype=dtype)
    results = []
    for scan in (lambda *a: ssd_chunked(*a, chunk_size=chunk), ssd_sequential):
        y, h = scan(*leaves)
        grads = torch.autograd.grad([y, h], [t for t in leaves if t is not None], [gy, gh])
        results.append((y, h, grads))
    (y, h, grads), (y_ref, h_ref, grads_ref) = results
    assert_scaled_close(y, y_ref, tol, "y")
    assert_scaled_close(h, h_ref, tol, "final state")
    for name, got, want in zip("x dt A B C D h0".split()[:len(grads)], grads, grads_ref, strict=True):
        assert torch.isfinite(got).all(), name
        assert_scaled_close(got, want, tol, f"d{name}")


def test_segsum_is_stable_where_differences_of_cumulative_sums_cancel():
    """One huge log-decay then small ones: cumsum[i] - cumsum[j] would lose the small sums in float32
    (the ulp at 1e6 is 0.0625); summing the segment directly keeps them."""
    a = torch.full((8,), -1e-3)
    a[1] = -1e6  # in every segment that starts at j = 0 and reaches i >= 1
    decay = torch.exp(segsum(a))
    i, j = torch.tril_indices(8, 8)
    want = torch.where((j == 0) & (i >= 1), 0.0, torch.exp(-1e-3 * (i - j).double())).float()
    torch.testing.assert_close(decay[i, j], want, atol=1e-7, rtol=1e-6)
    assert torch.all(decay.triu(1) == 0)


def reference_mamba2(sd: dict, u: torch.Tensor, d_state: int, headdim: int, ngroups: int):
    """The Mamba-2 equations in float64 from a reference-named state dict, one token and one head at a time."""
    sd = {k: v.double() for k, v in sd.items()}
    u = u.double()
    batch, L, _ = u.shape
    d_inner, N, P, G = sd["norm.weight"].numel(), d_state, headdim, ngroups
    H = d_inner // P
    A = -torch.exp(sd["A_log"])
    out = torch.zeros(batch, L, sd["out_proj.weight"].shape[0], dtype=torch.float64)
    for b in range(batch):
        proj = u[b] @ sd["in_proj.weight"].T
        z, xbc, dt_in = proj[:, :d_inner], proj[:, d_inner:2 * d_inner + 2 * G * N], proj[:, 2 * d_inner + 2 * G * N:]
        xbc = reference_causal_conv_silu(sd, xbc)
        x, Bm, Cm = xbc[:, :d_inner], xbc[:, d_inner:d_inner + G * N], xbc[:, d_inner + G * N:]
        h = torch.zeros(H, P, N, dtype=torch.float64)
        for t in range(L):
            y = torch.zeros(d_inner, dtype=torch.float64)
            for head in range(H):
                grp = head // (H // G)
                dt = torch.log1p(torch.exp(dt_in[t, head] + sd["dt_bias"][head]))
                xs = x[t, head * P:(head + 1) * P]
                Bt, Ct = Bm[t, grp * N:(grp + 1) * N], Cm[t, grp * N:(grp + 1) * N]
                h[head] = torch.exp(dt * A[head]) * h[head] + dt * torch.outer(xs, Bt)
                y[head * P:(head + 1) * P] = h[head] @ Ct + sd["D"][head] * xs
            gated = y * z[t] * torch.sigmoid(z[t])
            size = d_inner // G
            for grp in range(G):
                part = gated[grp * size:(grp + 1) * size]
                gated[grp * size:(grp + 1) * size] = part / torch.sqrt(part.square().mean() + 1e-5)
            out[b, t] = sd["out_proj.weight"] @ (gated * sd["norm.weight"])
    return out


@torch.no_grad()
def test_reference_state_dict_loads_and_matches_float64_equations():
    d_model, d_state, d_conv, expand, headdim, ngroups = 16, 4, 4, 2, 8, 2
    d_inner = expand * d_model
    H = d_inner // headdim
    g = torch.Generator().manual_seed(1)
    conv_dim = d_inner + 2 * ngroups * d_state
    state = {  # the reference module's names and shapes
        "in_proj.weight": torch.randn(2 * d_inner + 2 * ngroups * d_state + H, d_model, generator=g) * 0.3,
        "conv1d.weight": torch.randn(conv_dim, 1, d_conv, generator=g) * 0.5,
        "conv1d.bias": torch.randn(conv_dim, generator=g) * 0.1,
        "dt_bias": torch.randn(H, generator=g) - 2,
        "A_log": torch.log(torch.rand(H, generator=g) * 15 + 1),
        "D": torch.randn(H, generator=g),
        "norm.weight": torch.rand(d_inner, generator=g) + 0.5,
        "out_proj.weight": torch.randn(d_model, d_inner, generator=g) * 0.3,
    }
    mixer = Mamba2(d_model, d_state, d_conv, expand, headdim, ngroups, chunk_size=4)
    mixer.load_state_dict(state, strict=True)
    mixer.double()
    u = torch.randn(2, 11, d_model, generator=g, dtype=torch.float64)
    want = reference_mamba2(state, u, d_state, headdim, ngroups)
    torch.testing.assert_close(mixer(u), want, atol=1e-10, rtol=1e-10)
    # with a state: a 5-token prefill (two chunks, the second ragged), then single steps
    cache = mixer.new_state(2, "cpu", torch.float64)
    got = [mixer(u[:, :5], cache)] + [mixer(u[:, t:t + 1], cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-10, rtol=1e-10)


def test_reference_initialisation_and_shapes():
    torch.manual_seed(0)
    m = Mamba2(64, d_state=16, expand=2, headdim=16, ngroups=2)
    assert (m.d_inner, m.nheads) == (128, 8)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"in_proj.weight": (2 * 128 + 2 * 2 * 16 + 8, 64), "conv1d.weight": (128 + 64, 1, 4),
                      "conv1d.bias": (128 + 64,), "dt_bias": (8,), "A_log": (8,), "D": (8,),
                      "norm.weight": (128,), "out_proj.weight": (64, 128)}
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16 and A.max() / A.min() > 2
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.max() / dt.min() > 3
    assert torch.equal(m.D, torch.ones(8)) and torch.equal(m.norm.weight, torch.ones(128))
    model = AdambaLM.build(tiny_config(block_pattern="TM2", mamba2_headdim=16))
    assert torch.count_nonzero(model.blocks[1].mixer.out_proj.weight) == 0  # the block starts as the identity
    assert torch.count_nonzero(model.blocks[1].mixer.in_proj.weight) > 0
    x = torch.randn(2, 5, 64)
    assert torch.equal(model.blocks[1](x, model.context(5)), x)


@pytest.mark.parametrize("fields,name", [
    (dict(mamba2_headdim=48), "mamba2_headdim"),  # d_inner 128 is not a whole number of 48-wide heads
    (dict(mamba2_headdim=32, mamba2_ngroups=3), "mamba2_ngroups"),  # 4 heads in 3 groups
    (dict(mamba2_d_state=0), "mamba2_d_state"),
    (dict(mamba2_chunk_size=-4), "mamba2_chunk_size"),
    (dict(mamba2_expand=0), "mamba2_expand"),
    (dict(mamba2_d_conv=1.5), "mamba2_d_conv"),
])
def test_invalid_mamba2_config_names_field(fields, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        tiny_config(block_pattern="TM2", **fields)
    if name in ("mamba2_headdim", "mamba2_ngroups"):  # shapes only matter where an M2 block exists
        tiny_config(block_pattern="TM", **fields)


def random_model(pattern: str, dtype=torch.float32, **overrides) -> AdambaLM:
    """Random weights (zero-initialised projections would hide cache errors); Mamba timescales keep their init."""
    torch.manual_seed(0)
    model = AdambaLM(tiny_config(block_pattern=pattern, n_layer=len(parse_block_pattern(pattern)), **overrides))
    model = model.to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "dt_proj.bias", "dt_bias", "mixer.D")):
                p.normal_(0, 0.2)
    return model


M2_FIELDS = dict(mamba2_headdim=16, mamba2_ngroups=2, mamba2_d_state=8, mamba2_chunk_size=8)


@pytest.mark.parametrize("pattern,mlp", [("M2M2", True), ("TMM2", False), ("M2TM2M", False)])
@torch.no_grad()
def test_decode_equals_full_forward_for_every_prompt_length(pattern, mlp):
    model = random_model(pattern, sequence_len=64, n_kv_head=2, mamba_use_mlp=mlp, **M2_FIELDS)
    seq = torch.randint(0, 512, (1, 60))
    reference = model(seq)
    for prompt_len in range(1, 57, 1 if pattern == "M2M2" else 5):  # across chunk boundaries (chunk 8)
        cache = InferenceCache(model, 1, 60)
        torch.testing.assert_close(model(seq[:, :prompt_len], cache=cache), reference[:, :prompt_len],
                                   atol=1e-5, rtol=1e-5)
        for t in range(prompt_len, min(prompt_len + 3, 60)):
            torch.testing.assert_close(model(seq[:, t:t + 1], cache=cache)[:, 0], reference[:, t],
                                       atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padded_prefill_leaves_exactly_the_state_of_stepping():
    torch.manual_seed(0)
    mixer = Mamba2(32, d_state=8, headdim=16, chunk_size=4).double()
    lengths = torch.tensor([3, 9, 1])
    u = torch.randn(3, 9, 32, dtype=torch.float64)
    padded = mixer.new_state(3, "cpu", torch.float64)
    mixer(u, padded, valid=lengths)
    for b, n in enumerate(lengths.tolist()):
        stepped = mixer.new_state(1, "cpu", torch.float64)
        for t in range(n):
            mixer(u[b:b + 1, t:t + 1], stepped)
        torch.testing.assert_close(padded.ssm[b], stepped.ssm[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(padded.conv[b], stepped.conv[0], atol=1e-12, rtol=1e-12)


def test_engine_generates_with_mamba2_stacks():
    for pattern in ("M2M2", "TM2"):
        model = random_model(pattern, sequence_len=64, **M2_FIELDS)
        prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
        rows = Engine(model).generate(prompts, 8, SamplingParams(temperature=0))
        for prompt, row in zip(prompts, rows, strict=True):
            ids = list(prompt)
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            assert row.tokens == ids[len(prompt):]


@torch.no_grad()
def test_matryoshka_modes_keep_mamba2_at_full_width_and_decode_equals_forward():
    model = random_model("TM2", torch.float64, n_kv_head=2, **M2_FIELDS)
    config = model.config
    idx = torch.randint(0, 512, (1, 20))
    full = model.count_flops(20)
    for mode in config.compute_modes:
        widths = config.layer_widths(mode)
        assert widths[1] is None  # the M2 layer stays at full width in every mode
        reference = model(idx, compute=Compute(mode))
        cache = InferenceCache(model, 1, 20)
        out = [model(idx[:, :7], cache=cache, compute=Compute(mode))]
        out += [model(idx[:, t:t + 1], cache=cache, compute=Compute(mode)) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(out, 1), reference, atol=1e-10, rtol=1e-10)
        assert model.count_flops(20, compute=Compute(mode)).scan == full.scan


def test_optimizer_groups_and_flops_count_the_mixer():
    model = AdambaLM.build(tiny_config(block_pattern="TM2", mamba2_headdim=16, mamba2_d_state=16,
                                       mamba2_chunk_size=8))
    mixer = model.blocks[1].mixer
    assert_no_decay_group(model, [mixer.A_log, mixer.D, mixer.dt_bias, mixer.conv1d.bias, mixer.norm.weight])
    f = model.count_flops(32)
    matrices = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks") and p.ndim == 2)
    assert f.projections == 2 * matrices  # in_proj and out_proj (plus the attention block's)
    # d_inner 128, 8 heads, one group, d_state 16, conv over 128 + 2*16 channels, chunks of q = 8 tokens:
    # conv taps + C.B scores + scores x (dt x) + chunk state + entering state's output + state passing
    conv_dim, q = 160, 8
    assert f.scan == 2 * (conv_dim * 4 + q * 16 + 128 * q + 2 * 128 * 16 + 128 * 16 / q)
    assert model.count_flops(4).scan == 2 * (conv_dim * 4 + 4 * 16 + 128 * 4 + 2 * 128 * 16 + 128 * 16 / 4)
    assert f.forward == f.projections + f.attention + f.lm_head + f.scan and math.isclose(f.train, 3 * f.forward)
