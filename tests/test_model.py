import math

import pytest
import torch
from conftest import tiny_config

from adamba import AdambaLM
from adamba.model.attention import AttentionBlock


@torch.no_grad()
def reference_block(x, block: AttentionBlock, base: float = 10000.0):
    """Attention block written out position by position in float64, from the equations:
    h = x + Wo concat_h softmax_j(q_i.k_j / sqrt(d) over visible j) v_j, with q = norm(rot(Wq norm(x))) ...,
    then out = h + W2 relu(W1 norm(h))^2. Independent of the model code (loops, no SDPA, no rotary helper)."""
    x = x.double()
    W = {n: p.detach().double() for n, p in block.named_parameters()}
    attn = block.attn
    T, D = x.shape
    H, Hkv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    window = attn.window or T
    eps = torch.finfo(torch.float64).eps

    def norm(v):
        return v / torch.sqrt((v * v).mean() + eps)

    def rotate(v, t):
        half = hd // 2
        out = torch.empty_like(v)
        for i in range(half):
            angle = t * base ** (-2 * i / hd)
            c, s = math.cos(angle), math.sin(angle)
            out[i] = v[i] * c + v[i + half] * s
            out[i + half] = -v[i] * s + v[i + half] * c
        return out

    xn = torch.stack([norm(x[t]) for t in range(T)])
    q = (xn @ W["attn.c_q.weight"].T).view(T, H, hd)
    k = (xn @ W["attn.c_k.weight"].T).view(T, Hkv, hd)
    v = (xn @ W["attn.c_v.weight"].T).view(T, Hkv, hd)
    q = torch.stack([torch.stack([norm(rotate(q[t, h], t)) for h in range(H)]) for t in range(T)])
    k = torch.stack([torch.stack([norm(rotate(k[t, h], t)) for h in range(Hkv)]) for t in range(T)])
    y = torch.zeros(T, H, hd, dtype=torch.float64)
    for t in range(T):
        visible = [j for j in range(T) if j <= t and t - j < window]
        for h in range(H):
            g = h // (H // Hkv)  # the K/V head this query head shares
            scores = torch.tensor([float(q[t, h] @ k[j, g]) / math.sqrt(hd) for j in visible], dtype=torch.float64)
            p = torch.softmax(scores, 0)
            y[t, h] = sum(p[n] * v[j, g] for n, j in enumerate(visible))
    h1 = x + y.reshape(T, H * hd) @ W["attn.c_proj.weight"].T
    hn = torch.stack([norm(h1[t]) for t in range(T)])
    return h1 + torch.relu(hn @ W["mlp.c_fc.weight"].T) ** 2 @ W["mlp.c_proj.weight"].T


@pytest.mark.parametrize("n_kv_head,window", [(4, None), (2, None), (1, 3)])
def test_attention_block_matches_float64_equations(n_kv_head, window):
    torch.manual_seed(0)
    block = AttentionBlock(32, 4, n_kv_head, 128, window).double()
    for p in block.parameters():  # random weights everywhere (init zeroes c_proj, which would hide errors)
        torch.nn.init.normal_(p, std=0.3)
    T = 9
    x = torch.randn(1, T, 32, dtype=torch.float64)
    model = AdambaLM(tiny_config(n_embd=32, n_head=4, sequence_len=16)).double()
    got = block(x, model.context(T))[0]
    want = reference_block(x[0], block)
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-10), (got - want).abs().max()


def test_sliding_window_changes_output_only_beyond_window():
    torch.manual_seed(0)
    full = AttentionBlock(32, 4, 4, 128, None)
    windowed = AttentionBlock(32, 4, 4, 128, 4)
    windowed.load_state_dict(full.state_dict())
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.3)
    windowed.load_state_dict(full.state_dict())
    model = AdambaLM(tiny_config(n_embd=32, n_head=4))
    x = torch.randn(1, 10, 32)
    a, b = full(x, model.context(10)), windowed(x, model.context(10))
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


def test_model_forward_matches_block_composition():
    """The model is embedding -> norm -> blocks -> norm -> lm_head -> softcap, in float64."""
    torch.manual_seed(0)
    model = AdambaLM(tiny_config(window_pattern="SL", short_window=5)).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    idx = torch.randint(0, 512, (2, 12))
    x = torch.nn.functional.rms_norm(model.wte.weight[idx], (64,))
    for block in model.blocks:
        x = torch.stack([reference_block(x[b], block) for b in range(2)])
    logits = torch.nn.functional.rms_norm(x, (64,)) @ model.lm_head.weight.T
    logits = 15 * torch.tanh(logits / 15)
    assert torch.allclose(model(idx), logits, atol=1e-9)


def test_init_is_identity_blocks_and_uniform_logits():
    model = AdambaLM.build(tiny_config())
    idx = torch.randint(0, 512, (2, 16))
    logits = model(idx)
    assert torch.allclose(logits, torch.zeros_like(logits))
    assert math.isclose(model(idx, idx).item(), math.log(512), rel_tol=1e-6)
    assert model.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)


def test_loss_ignores_minus_one_targets():
    model = AdambaLM(tiny_config())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    idx = torch.randint(0, 512, (2, 8))
    targets = torch.randint(0, 512, (2, 8))
    masked = targets.clone()
    masked[:, :4] = -1
    per_token = model(idx, targets, loss_reduction="none").view(2, 8)
    assert torch.allclose(model(idx, masked), per_token[:, 4:].mean())


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = AdambaLM.build(tiny_config())
    idx = torch.randint(0, 512, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(x, y).item()
    for _ in range(150):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 6.0 and loss.item() < 0.1


def test_bad_inputs_raise_clear_errors():
    model = AdambaLM(tiny_config(sequence_len=8))
    with pytest.raises(ValueError, match="sequence_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, time"):
        model(torch.zeros(9, dtype=torch.long))


def test_meta_build_and_flop_counter():
    cfg = tiny_config(window_pattern="SL", short_window=4)
    model = AdambaLM.build(cfg)
    assert all(p.device.type == "cpu" for p in model.parameters())
    f = model.count_flops(32)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks"))
    assert f.projections == 2 * matmul_params
    assert f.lm_head == 2 * 64 * 512
    # layer 0 sees min(t+1, 4) keys, layer 1 sees t+1: 4 heads x 16 dims x 2 products x 2 FLOPs
    keys = sum(min(t + 1, 4) for t in range(32)) / 32 + sum(t + 1 for t in range(32)) / 32
    assert f.attention == pytest.approx(2 * 2 * 64 * keys)
    assert f.train == 3 * f.forward
