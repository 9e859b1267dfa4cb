"""Per-token early exit and expansion (model/exits.py): against a truncated model, a full forward with the same
decisions, caches computed by hand in float64, and hand FLOP counts."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from adamba import AdambaLM, ModelConfig
from adamba.model.cache import InferenceCache
from adamba.model.compute import Compute
from adamba.model.exits import Adaptive
from adamba.model.flops import count_flops
from tests.test_matryoshka import per_token_width_reference

KEEP_INIT = ("A_log", "dt_proj.bias", "mixer.D", "dt_bias")  # Mamba's timescales keep their init


def random_model(dtype=torch.float64, **overrides) -> AdambaLM:
    torch.manual_seed(0)
    fields = dict(block_pattern="TMTM2", n_layer=4, min_exit_layer=1, mamba2_headdim=32)
    fields.update(overrides)
    model = AdambaLM(tiny_config(**fields)).to(dtype).eval()
    for name, p in model.named_parameters():  # random: zero-initialised projections would hide cache errors
        if not name.endswith(KEEP_INIT):
            torch.nn.init.normal_(p, std=0.3)
    return model


def norm(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + torch.finfo(v.dtype).eps)


def hidden_states(model: AdambaLM, idx: torch.Tensor) -> list[torch.Tensor]:
    """x_0 .. x_L of a plain full forward (no exits)."""
    T = idx.size(1)
    xs = [norm(model.wte(idx))]
    for block in model.blocks:
        xs.append(block(xs[-1], model.context(T)))
    return xs


@torch.no_grad()
def test_exit_at_layer_k_is_the_truncated_model():
    model = random_model()
    idx = torch.randint(0, 512, (2, 17))
    for k in range(model.config.n_layer + 1):
        cfg = tiny_config(block_pattern=model.config.block_pattern[:k] or "T", n_layer=max(k, 1),
                          mamba2_headdim=32)
        truncated = AdambaLM(cfg).double().eval()
        state = {name: p for name, p in model.state_dict().items()
                 if not name.startswith(("adaptive_heads", "blocks.")) or
                 (name.startswith("blocks.") and int(name.split(".")[1]) < k)}
        if k == 0:  # no block at all: the head reads the embedding (the truncated model's one block is dropped)
            truncated.blocks = torch.nn.ModuleList()
        truncated.load_state_dict(state, strict=True)
        exits = torch.full((2, 17), k)
        torch.testing.assert_close(model(idx, exit_layers=exits), truncated(idx), atol=1e-12, rtol=1e-12)


# float32 at batch 1, as test_engine does: rows batched together round differently from a full forward (kernels
# pick vector widths by shape); the batched case, with rows exiting at different layers in one step, in float64.
@pytest.mark.parametrize("dtype,batch,tol", [(torch.float32, 1, 1e-5), (torch.float64, 3, 1e-10)])
@torch.no_grad()
def test_decode_with_gated_exits_equals_the_full_forward_with_the_same_decisions(dtype, batch, tol):
    model = random_model(dtype)
    policy = Adaptive(threshold=0.6)  # random gates: tokens exit after every layer, or run them all
    idx = torch.randint(0, 512, (batch, 24))
    cache = InferenceCache(model, batch, 24)
    steps = [model(idx[:, :6], cache=cache, compute=Compute(adaptive=policy), outputs=True)]
    steps += [model(idx[:, t:t + 1], cache=cache, compute=Compute(adaptive=policy), outputs=True) for t in range(6, 24)]
    out, decisions = [s.logits for s in steps], [s.exits.exit_layer for s in steps]
    decisions = torch.cat(decisions, dim=1)
    assert set(decisions.unique().tolist()) == {1, 2, 3, 4}  # every exit layer, and no exit, occur
    if batch > 1:
        # some decode step has rows exiting at different layers (mixed rows in one step)
        assert any(len(set(decisions[:, t].tolist())) > 1 for t in range(6, 24))
    reference = model(idx, exit_layers=decisions)
    torch.testing.assert_close(torch.cat(out, dim=1), reference, atol=tol, rtol=tol)
    # a full forward whose gates decide on the fly decides the same (each decision reads only earlier layers)
    adaptive_full = model(idx, compute=Compute(adaptive=policy), outputs=True)
    if dtype == torch.float64:
        assert torch.equal(adaptive_full.exits.exit_layer, decisions)
        torch.testing.assert_close(adaptive_full.logits, reference, atol=1e-12, rtol=1e-12)


def rotate(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = v.size(-1) // 2
    a, b = v[..., :half], v[..., half:]
    cos, sin = cos[..., :half], sin[..., :half]  # the model's tables hold [cos, cos] and [sin, -sin]
    return torch.cat([a * cos + b * sin, b * cos - a * sin], -1)


def mamba1_state(mixer, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv window, SSM state) after feeding inputs (L, d_model) one by one, written out in float64."""
    d_inner, K = mixer.d_inner, mixer.d_conv
    W = mixer.in_proj.weight[:d_inner]
    A = -torch.exp(mixer.A_log)
    xs = [W @ u for u in inputs]
    h = torch.zeros(d_inner, mixer.d_state, dtype=torch.float64)
    for t in range(len(xs)):
        window = torch.stack([xs[s] if s >= 0 else torch.zeros(d_inner, dtype=torch.float64)
                              for s in range(t - K + 1, t + 1)], -1)
        x = F.silu((window * mixer.conv1d.weight[:, 0]).sum(-1) + mixer.conv1d.bias)
        dt, B, _ = (mixer.x_proj.weight @ x).split([mixer.dt_rank, mixer.d_state, mixer.d_state])
        dt = F.softplus(mixer.dt_proj.weight @ dt + mixer.dt_proj.bias)
        h = torch.exp(dt[:, None] * A) * h + (dt * x)[:, None] * B[None, :]
    conv = torch.stack(xs[-(K - 1):], -1)
    return conv, h


def mamba2_state(mixer, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv window, SSM state) of a Mamba-2 mixer after inputs (L, d_model), one scalar decay per head."""
    d_inner, conv_dim, H, P, N, K = (mixer.d_inner, mixer.conv_dim, mixer.nheads, mixer.headdim, mixer.d_state,
                                     mixer.d_conv)
    zxbcdt = [mixer.in_proj.weight @ u for u in inputs]
    xbcs = [v[d_inner:d_inner + conv_dim] for v in zxbcdt]
    A = -torch.exp(mixer.A_log)
    h = torch.zeros(H, P, N, dtype=torch.float64)
    for t in range(len(xbcs)):
        window = torch.stack([xbcs[s] if s >= 0 else torch.zeros(conv_dim, dtype=torch.float64)
                              for s in range(t - K + 1, t + 1)], -1)
        xbc = F.silu((window * mixer.conv1d.weight[:, 0]).sum(-1) + mixer.conv1d.bias)
        x, B = xbc[:d_inner].view(H, P), xbc[d_inner:d_inner + N]  # one group
        dt = F.softplus(zxbcdt[t][d_inner + conv_dim:] + mixer.dt_bias)
        h = torch.exp(dt * A)[:, None, None] * h + (dt[:, None] * x)[..., None] * B[None, None, :]
    return torch.stack(xbcs[-(K - 1):], -1), h


@torch.no_grad()
def test_the_cache_after_propagation_is_what_a_hand_computation_gives():
    # T, M, T, M2: the last token exits after block 1, so blocks 1..3 only receive its state from h_1
    model = random_model()
    T = 9
    idx = torch.randint(0, 512, (1, T))
    cache = InferenceCache(model, 1, T + 1)
    model(idx[:, :T - 1], cache=cache)
    model(idx[:, T - 1:], cache=cache, exit_layers=torch.tensor([[1]]))
    xs = hidden_states(model, idx[:, :T - 1])  # earlier tokens ran every block
    h1 = hidden_states(model, idx)[1][0, -1]  # the exiting token's frozen hidden state (blocks < 1 only)
    for j in (1, 2, 3):
        block, state = model.blocks[j], cache.states[j]
        inputs = torch.cat([norm(xs[j][0]), norm(h1)[None]])  # what block j saw: earlier tokens', then h_1
        if block.kind == "T":
            attn = block.attn
            k = (attn.c_k.weight @ inputs[-1]).view(attn.n_kv_head, attn.head_dim)
            v = (attn.c_v.weight @ inputs[-1]).view(attn.n_kv_head, attn.head_dim)
            k = norm(rotate(k, model.cos[T - 1], model.sin[T - 1]))
            torch.testing.assert_close(state.k[0, :, T - 1], k, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(state.v[0, :, T - 1], v, atol=1e-12, rtol=1e-12)
        else:
            conv, ssm = (mamba1_state if block.kind == "M" else mamba2_state)(block.mixer, inputs)
            torch.testing.assert_close(state.conv[0], conv, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(state.ssm[0], ssm, atol=1e-10, rtol=1e-10)
    # and the state a later token reads continues from there: decoding one more token equals the reference
    nxt = torch.randint(0, 512, (1, 1))
    step = model(nxt, cache=cache)
    exits = torch.tensor([[4] * (T - 1) + [1, 4]])
    torch.testing.assert_close(step[:, 0], model(torch.cat([idx, nxt], 1), exit_layers=exits)[:, -1],
                               atol=1e-10, rtol=1e-10)


def test_flop_counter_counts_propagation_and_gates_by_hand():
    # T (n_embd 64, 4 heads of 16, 2 K/V heads), M (d_inner 128, d_state 16, dt_rank 4, d_conv 4),
    # M2 (d_inner 128, headdim 32 -> 4 heads, d_state 64, one group: conv_dim 256, chunk min(64, 32) = 32)
    cfg = tiny_config(block_pattern="TMM2", n_layer=3, n_kv_head=2, min_exit_layer=1, mamba2_headdim=32)
    lm_head, gate = 2 * 64 * 512, 2 * (64 * 64 + 64)
    attn_full = 2 * 64 * (64 + 2 * 32) + 2 * 64 * 64 + 4 * 64 * 256 + 4 * 64 * 16.5
    attn_kv = 2 * 64 * 2 * 32  # K and V projections only
    m1_scan = 2 * 128 * 4 + 6 * 128 * 16
    m1_full = 2 * (64 * 256 + 128 * (4 + 32) + 4 * 128 + 128 * 64) + m1_scan
    m1_prop = 2 * (64 * 128 + 128 * (4 + 32) + 4 * 128) + m1_scan  # x half of in_proj, no out_proj
    m2_scan = 2 * (256 * 4 + 32 * 64 + 128 * 32 + 2 * 128 * 64 + 128 * 64 / 32)
    m2_full = 2 * (64 * (128 + 256 + 4) + 128 * 64) + m2_scan
    m2_prop = 2 * 64 * (256 + 4) + m2_scan  # in_proj without z, no out_proj
    assert count_flops(cfg, 32).forward == pytest.approx(attn_full + m1_full + m2_full + lm_head)
    cases = {0: attn_kv + m1_prop + m2_prop, 1: attn_full + m1_prop + m2_prop, 2: attn_full + m1_full + m2_prop,
             3: attn_full + m1_full + m2_full}
    for e, blocks in cases.items():
        assert count_flops(cfg, 32, exit_layer=e, gates=2).forward == pytest.approx(blocks + lm_head + 2 * gate)
    # per-token records: the mean over tokens of each token's own count
    model = AdambaLM(cfg)
    out = model(torch.zeros(1, 4, dtype=torch.long), exit_layers=torch.tensor([[1, 1, 3, 2]]), outputs=True)
    want = (2 * cases[1] + cases[3] + cases[2]) / 4 + lm_head
    assert out.exits.flops(cfg, 32) == pytest.approx(want)
    assert model.count_flops(32, exit_layer=2).forward == pytest.approx(cases[2] + lm_head)


def test_adaptive_inputs_fail_with_clear_errors():
    with pytest.raises(ValueError, match="^min_exit_layer: must be an integer in"):
        tiny_config(min_exit_layer=2)
    with pytest.raises(ValueError, match="^min_exit_layer: early exit is not defined for looped models"):
        ModelConfig(vocab_size=64, n_embd=64, n_head=4, loop={"prelude": 1, "recur": 1, "coda": 1},
                    min_exit_layer=1)
    with pytest.raises(ValueError, match="^expansion_gates: no attention layer"):
        tiny_config(block_pattern="TM", n_layer=4, expansion_gates=True)
    with pytest.raises(ValueError, match="^predictor_layers: no attention layer"):
        tiny_config(block_pattern="TM", n_layer=2, predictor_layers=1)
    with pytest.raises(ValueError, match="^gate_hidden"):
        tiny_config(gate_hidden=0)
    model = random_model(torch.float32)
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="^exit_layers: every value must be in"):
        model(idx, exit_layers=torch.tensor([[5, 1, 1]]))
    with pytest.raises(ValueError, match="^exit_layers: must be an integer tensor"):
        model(idx, exit_layers=torch.ones(1, 3))
    with pytest.raises(ValueError, match="^adaptive.threshold: layers"):
        model(idx, compute=Compute(adaptive=Adaptive(threshold={0: 0.5})))
    with pytest.raises(ValueError, match="^adaptive.expand: this model has no ExpansionGates"):
        model(idx, compute=Compute(adaptive=Adaptive(expand=0.5)))
    with pytest.raises(ValueError, match="^adaptive: this model has no gates"):
        AdambaLM(tiny_config())(idx, compute=Compute(adaptive=Adaptive()))
    with pytest.raises(ValueError, match="^adaptive.threshold: this model has no exit gates"):
        expanding_only = random_model(block_pattern="MMMT", min_exit_layer=None, expansion_gates=True)
        expanding_only(idx, compute=Compute(adaptive=Adaptive(threshold=0.5)))


def test_calibrated_thresholds_are_the_default_and_the_seeds_stay_selectable():
    model = random_model(torch.float32)
    assert Adaptive().exit_thresholds(model) == {1: 0.95, 2: 0.95, 3: 0.95}
    model.adaptive_heads.thresholds = {1: 0.9, 2: 0.8, 3: math.inf}
    assert Adaptive().exit_thresholds(model) == {1: 0.9, 2: 0.8, 3: math.inf}
    assert Adaptive.seeds().exit_thresholds(model) == {1: 0.95, 2: 0.95, 3: 0.95}
    assert Adaptive.seeds().expand == 0.5
    assert Adaptive(exit=False).exit_thresholds(model) == {}


def expansion_model() -> AdambaLM:
    # the only attention layer (3) comes after the expansion gate at layer 3 = 0.75 n_layer: a token's attention
    # width is then one number, which per_token_width_reference takes
    return random_model(block_pattern="MMMT", n_layer=4, n_kv_head=2, min_exit_layer=None, expansion_gates=True)


@torch.no_grad()
def test_expansion_gives_each_token_the_width_the_per_token_reference_computes():
    model = expansion_model()
    idx = torch.randint(0, 512, (1, 14))
    out = model(idx, compute=Compute(width="ghost", adaptive=Adaptive(exit=False, expand=0.5)), outputs=True)
    logits, widths = out.logits, out.exits.widths[0, :, 3].tolist()
    assert set(widths) == {16, 32}  # ghost is 16 wide; unsure tokens double to 32
    torch.testing.assert_close(logits[0], per_token_width_reference(model, idx[0].tolist(), widths),
                               atol=1e-9, rtol=1e-9)
    # decoding decides the same per token, and gives the same logits
    cache = InferenceCache(model, 1, 14)
    expanding = Compute(width="ghost", adaptive=Adaptive(exit=False, expand=0.5))
    steps = [model(idx[:, :4], cache=cache, compute=expanding, outputs=True)]
    steps += [model(idx[:, t:t + 1], cache=cache, compute=expanding, outputs=True) for t in range(4, 14)]
    assert torch.cat([s.exits.widths[0, :, 3] for s in steps]).tolist() == widths
    torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), logits, atol=1e-10, rtol=1e-10)
    # threshold 0: nobody expands (the plain ghost model); 1: everybody does (the 32-wide model)
    torch.testing.assert_close(model(idx, compute=Compute(width="ghost", adaptive=Adaptive(exit=False, expand=0.0))),
                               model(idx, compute=Compute("ghost")))
    torch.testing.assert_close(model(idx, compute=Compute(width="ghost", adaptive=Adaptive(exit=False, expand=1.0))),
                               model(idx, compute=Compute(32)))


@pytest.mark.parametrize("recipe", [False, True], ids=["october-2025", "today"])
@torch.no_grad()
def test_engine_decodes_with_exits_and_predicted_widths_as_each_row_alone_would(recipe):
    """Rows at different widths share each prefill and decode step (the attention's mixed-width path); with
    today's recipe its value embeddings read the token ids there too."""
    from adamba.infer.engine import Engine
    from adamba.infer.sampling import SamplingParams
    from adamba.model.predictor import predict_widths

    options = dict(residual_scalars=True, value_embeds="alternating", smear=True, backout=True) if recipe else {}
    model = random_model(block_pattern="TMTT", n_layer=4, predictor_layers=1, sequence_len=40, **options)
    for gate in model.adaptive_heads.exit_gates.values():  # unsaturated confidences: tokens exit at every layer
        gate.out.weight.mul_(0.05)
    policy = Adaptive(threshold=0.6, predictor=True)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 9, 6, 12)]
    plans = [predict_widths(model, torch.tensor([p]))[0] for p in prompts]
    assert len({tuple(p) for p in plans}) > 1  # rows run at different widths in one batch
    rows = Engine(model).generate(prompts, 10, SamplingParams(temperature=0), compute=Compute(adaptive=policy))
    exits = set()
    for prompt, plan, row in zip(prompts, plans, rows, strict=True):
        ids = list(prompt)
        for _ in range(10):  # greedy, one full forward per token, the row alone
            alone = Compute(adaptive=Adaptive(threshold=0.6, row_widths=(tuple(plan),)))
            out = model(torch.tensor([ids]), compute=alone, outputs=True)
            exits |= set(out.exits.exit_layer[0, len(prompt):].tolist())
            ids.append(int(out.logits[0, -1].argmax()))
        assert row.tokens == ids[len(prompt):]
    assert len(exits) > 1  # generated tokens exited at different layers


@pytest.mark.parametrize("width", [32, "ghost"])
@torch.no_grad()
def test_decode_with_gated_exits_at_a_matryoshka_width_equals_the_full_forward(width):
    """At a sliced width an exited token still leaves the K/V of its width's heads (and the layer input a wider
    query would need) for later tokens."""
    model = random_model()
    policy = Adaptive(threshold=0.6)
    idx = torch.randint(0, 512, (3, 24))
    cache = InferenceCache(model, 3, 24)
    compute = Compute(width=width, adaptive=policy)
    steps = [model(idx[:, :6], cache=cache, compute=compute, outputs=True)]
    steps += [model(idx[:, t:t + 1], cache=cache, compute=compute, outputs=True) for t in range(6, 24)]
    out, decisions = [s.logits for s in steps], [s.exits.exit_layer for s in steps]
    decisions = torch.cat(decisions, dim=1)
    assert set(decisions.unique().tolist()) == {1, 2, 3, 4}
    assert any(bool((decisions[:, t] < 4).all()) for t in range(6, 24))  # a step where every row exits early
    reference = model(idx, compute=Compute(width), exit_layers=decisions)
    torch.testing.assert_close(torch.cat(out, dim=1), reference, atol=1e-10, rtol=1e-10)
