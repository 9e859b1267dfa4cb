"""Looped depth recurrence (adamba/model/looped.py): config, the looped forward against references written from
the equations, cached decoding against full forwards (fixed r, per-token r, adaptive exit, warm start, per-iteration
widths), the FLOP counter against a hand count, and the training-time draw of r."""

from __future__ import annotations

import dataclasses
import re
import statistics

import pytest
import torch
from conftest import tiny_config

from adamba import AdambaLM, ModelConfig
from adamba.config import load_toml
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams
from adamba.model.cache import InferenceCache
from adamba.model.compute import Compute
from adamba.model.looped import LATENT_EXIT_THRESHOLD, Loops
from adamba.model.norm import rms_norm
from adamba.train.loops import sample_loops

V = 64


def looped_config(pattern="T", prelude=1, recur=2, coda=1, **loop) -> ModelConfig:
    loop = dict(prelude=prelude, recur=recur, coda=coda, **{"mean_recurrence": 3, **loop})
    return tiny_config(vocab_size=V, n_embd=32, n_head=2, sequence_len=48, block_pattern=pattern,
                       n_layer=prelude + recur + coda, loop=loop)


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.15, state_std: float | None = None) -> AdambaLM:
    """Every weight random (zero-initialised projections, lm_head and inject's zero half would hide cache
    errors); `state_std` scales inject's state half, small values making the loop contract."""
    torch.manual_seed(seed)
    model = AdambaLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "dt_proj.bias", "mixer.D")):  # Mamba's timescales keep their init
                torch.nn.init.normal_(p, std=std)
        if model.loop.norms is not None:
            for norm in model.loop.norms:
                norm.weight.add_(1.0)
        if state_std is not None:
            d = config.n_embd
            model.loop.inject.weight[:, d:].normal_(std=state_std)
    return model


def decode(model, seq, prompt_len, loops_per_call, cache_loops):
    """Prefill seq[:, :prompt_len], then feed one token at a time; return the logits of every position and
    the iterations each token ran (the forward's `loops` output)."""
    cache = InferenceCache(model, seq.size(0), seq.size(1), compute=Compute(loops=cache_loops))
    steps = [model(seq[:, :prompt_len], cache=cache, compute=Compute(loops=loops_per_call(0, prompt_len)),
                   outputs=True)]
    steps += [model(seq[:, t:t + 1], cache=cache, compute=Compute(loops=loops_per_call(t, t + 1)), outputs=True)
              for t in range(prompt_len, seq.size(1))]
    return torch.cat([s.logits for s in steps], dim=1), torch.cat([s.loops for s in steps], dim=1)


# --- config -------------------------------------------------------------------------------------------------
def test_loop_config_derives_layers_and_round_trips(tmp_path):
    config = ModelConfig(vocab_size=V, size=2, head_dim=32, block_pattern="TTM",
                         loop={"prelude": 1, "recur": 3, "coda": 2, "mean_recurrence": 5})
    assert config.n_layer == 6 and config.block_pattern == list("TTMTTM")
    assert config.n_embd == 128  # size x aspect_ratio (64), rounded up to the head dim
    assert list(config.loop.recurrent_layers) == [1, 2, 3] and config.loop.r_max == 20
    assert ModelConfig.from_dict(config.to_dict()) == config
    flag = ModelConfig(vocab_size=V, loop="prelude=1, recur=3, coda=2, mean_recurrence=5, sandwich_norm=true")
    assert flag.loop.recur == 3 and flag.loop.sandwich_norm is True
    path = tmp_path / "looped.toml"
    path.write_text("[model]\nvocab_size = 64\nsize = 2\nhead_dim = 32\nblock_pattern = 'TTM'\n"
                    "[model.loop]\nprelude = 1\nrecur = 3\ncoda = 2\nmean_recurrence = 5\n")
    assert load_toml(path).model == config


@pytest.mark.parametrize("fields, name", [
    (dict(loop={"prelude": -1}), "loop.prelude"),
    (dict(loop={"recur": 0}), "loop.recur"),
    (dict(loop={"mean_recurrence": 8, "r_max": 4}), "loop.r_max"),
    (dict(loop={"init_state": "zeros"}), "loop.init_state"),
    (dict(loop={"init_sigma": 0}), "loop.init_sigma"),
    (dict(loop={"backprop_depth": 0}), "loop.backprop_depth"),
    (dict(loop={"sandwich_norm": "yes"}), "loop.sandwich_norm"),
    (dict(loop={"recurse": 2}), "loop"),
    (dict(loop="prelude"), "loop"),
    (dict(loop=[2, 4, 2]), "loop"),
    (dict(loop={}, n_layer=5), "loop"),
    (dict(loop={}, depth=12), "loop"),
    (dict(size=0), "size"),
])
def test_invalid_loop_config_names_field(fields, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        ModelConfig(vocab_size=V, **fields)


def test_invalid_loops_arguments_name_the_problem():
    model = random_model(looped_config())
    idx = torch.randint(0, V, (2, 5))
    for bad, match in [(0, "loops.r"), (torch.zeros(2, 5, dtype=torch.long), "at least one"),
                       (torch.ones(2, 4, dtype=torch.long), "shaped"), (2.5, "expected an int")]:
        with pytest.raises(ValueError, match=match):
            model(idx, compute=Compute(loops=bad))
    for fields, name in [(dict(exit="entropy"), "loops.exit"), (dict(threshold=0.1), "loops.threshold"),
                         (dict(exit="kl", threshold=-1.0), "loops.threshold"), (dict(kv_budget=0), "loops.kv_budget")]:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            Loops(**fields)
    with pytest.raises(ValueError, match="holds 2 slots"):
        model(idx, cache=InferenceCache(model, 2, 8, compute=Compute(loops=2)), compute=Compute(loops=3))
    plain = AdambaLM(tiny_config())
    with pytest.raises(ValueError, match="no loop"):
        plain(idx, compute=Compute(loops=2))
    with pytest.raises(ValueError, match="no loop"):
        InferenceCache(plain, 2, 8, compute=Compute(loops=2))


# --- the looped forward ------------------------------------------------------------------------------------
@torch.no_grad()
def test_inject_init_reads_only_the_input_so_r1_is_a_plain_stack_with_two_norms():
    """inject = [I | 0] at init: the state is ignored, so every r and both initial states give the same output,
    which is the model's layers run once in order with a norm on the loop's input and output (float64)."""
    config = looped_config("TM", prelude=2, recur=2, coda=2, init_state="prelude")
    model = random_model(config).double()
    model.loop.init_weights()  # back to [I | 0]
    idx = torch.randint(0, V, (2, 12))
    T = idx.size(1)
    x = rms_norm(model.wte(idx))
    for i, block in enumerate(model.blocks):
        if i == 2:
            x = rms_norm(x)  # e, the loop's input
        x = block(x, model.context(T))
        if i == 3:
            x = rms_norm(x)  # the norm after the loop
    reference = 15 * torch.tanh(model.lm_head(rms_norm(x)) / 15)
    torch.testing.assert_close(model(idx, compute=Compute(loops=1)), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(idx, compute=Compute(loops=7)), reference, rtol=1e-12, atol=1e-12)
    model.config.loop.init_state = "random"
    torch.testing.assert_close(model(idx, compute=Compute(loops=2)), reference, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_looped_forward_matches_the_equations_in_float64():
    """s_{i+1} = norm(post_norm(R(W [e; s_i]))) written out with the blocks of a non-looped model holding the same
    weights: the recurrence, random initial state (the eval-mode table) and sandwich norms."""
    config = looped_config("TM", prelude=1, recur=2, coda=1, init_state="random", sandwich_norm=True)
    model = random_model(config).double()
    plain = AdambaLM(dataclasses.replace(config, loop=None)).double().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("loop.")})
    idx = torch.randint(0, V, (2, 10))
    T, W = idx.size(1), model.loop.inject.weight
    gen = torch.Generator().manual_seed(config.loop.init_seed)
    s = (torch.randn(config.sequence_len, config.n_embd, generator=gen) * config.loop.init_sigma)[:T].double()
    e = rms_norm(plain.blocks[0](rms_norm(plain.wte(idx)), plain.context(T)))
    s = s.expand_as(e)
    for _ in range(4):
        h = torch.cat([e, s], dim=-1) @ W.T
        for j, layer in enumerate((1, 2)):
            h = plain.blocks[layer](h, plain.context(T))
            norm = model.loop.norms[j]
            h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + torch.finfo(h.dtype).eps) * norm.weight
        s = rms_norm(h)
    reference = plain.head(plain.blocks[3](s, plain.context(T)))
    torch.testing.assert_close(model(idx, compute=Compute(loops=4)), reference, rtol=1e-10, atol=1e-10)


def test_truncated_backprop_equals_restarting_from_the_detached_state(monkeypatch):
    """With backprop_depth k = 1, the gradient of r = 3 is the gradient of one iteration started from the state
    two iterations leave, detached (Huginn's truncation: no gradient through the first r - k iterations)."""
    model = random_model(looped_config("T", backprop_depth=1)).train()
    idx, targets = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    states = []
    hook = model.blocks[3].register_forward_pre_hook(lambda module, args: states.append(args[0]))
    with torch.no_grad():
        model(idx, compute=Compute(loops=2))
    hook.remove()
    model(idx, targets, compute=Compute(loops=3)).backward()
    truncated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(model.loop, "initial_state", lambda e, cache: states[0].detach())
    model(idx, targets, compute=Compute(loops=1)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(truncated[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


# --- cached decoding --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, loop", [
    ("T", {}),
    ("TM", {"init_state": "random", "sandwich_norm": True}),
    ("MT", {"prelude": 0, "coda": 2}),
], ids=["attention", "hybrid-random-sandwich", "mamba-first-no-prelude"])
@torch.no_grad()
def test_decode_with_a_slot_per_iteration_equals_full_forward(pattern, loop):
    model = random_model(looped_config(pattern, **loop))
    seq = torch.randint(0, V, (2, 20))
    for r in (1, 4):
        reference = model(seq, compute=Compute(loops=r))
        for prompt_len in (1, 7):
            logits, _ = decode(model, seq, prompt_len, lambda t, u, r=r: r, r)
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("pattern", ["T", "TM", ["T", "M2"]], ids=["attention", "hybrid", "hybrid-mamba2"])
@torch.no_grad()
def test_decode_with_per_token_loops_equals_full_forward_with_the_same_counts(pattern, dtype, tolerance):
    """Each token runs its own number of iterations; slots it skips hold the latest available state (K/V copied,
    Mamba stepped on the token's last input), and fewer iterations than the cache's slots fill the rest."""
    model = random_model(looped_config(pattern, recur=2)).to(dtype)
    seq = torch.randint(0, V, (2, 18))
    counts = torch.randint(1, 6, seq.shape)
    logits, ran = decode(model, seq, 5, lambda t, u: counts[:, t:u], 6)
    assert torch.equal(ran, counts)
    torch.testing.assert_close(logits, model(seq, compute=Compute(loops=counts)), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("criterion, threshold", [("latent", 1e-2), ("kl", 1e-4)])
@pytest.mark.parametrize("pattern", ["T", "TM"], ids=["attention", "hybrid"])
@torch.no_grad()
def test_decode_with_adaptive_exit_equals_full_forward_with_the_same_per_token_loops(pattern, criterion, threshold):
    model = random_model(looped_config(pattern), state_std=0.05)  # a contracting loop: exits vary
    seq = torch.randint(0, V, (2, 16))
    plan = Loops(12, exit=criterion, threshold=threshold)
    logits, ran = decode(model, seq, 4, lambda t, u: plan, plan)
    assert 1 < ran.min() and len(ran.unique()) >= 3 and ran.max() <= 12, ran  # the test means something
    torch.testing.assert_close(logits, model(seq, compute=Compute(loops=ran)), atol=1e-5, rtol=1e-5)
    full = model(seq, compute=Compute(loops=plan), outputs=True)  # adaptive exit in one pass over the whole sequence
    if criterion == "latent":  # decided by each token's own loop: the same counts as decoding
        assert torch.equal(full.loops, ran)
        torch.testing.assert_close(full.logits, logits, atol=1e-5, rtol=1e-5)
    else:  # its probes run the coda while earlier tokens still iterate: counts may differ, never the rule
        torch.testing.assert_close(full.logits, model(seq, compute=Compute(loops=full.loops)), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_adaptive_exit_default_threshold_is_named():
    model = random_model(looped_config("T"), state_std=0.05)
    idx = torch.randint(0, V, (1, 8))
    default = model(idx, compute=Compute(loops=Loops(10, exit="latent")), outputs=True).loops
    explicit = Loops(10, exit="latent", threshold=LATENT_EXIT_THRESHOLD)
    given = model(idx, compute=Compute(loops=explicit), outputs=True).loops
    assert torch.equal(given, default)


@torch.no_grad()
def test_warm_start_decode_equals_full_forwards_started_from_the_previous_final_state(monkeypatch):
    """Warm start: each decoded token's loop starts from its predecessor's final state. Reference: full forwards
    over growing prefixes whose initial states are overridden by hand with the final states (read at the coda's
    input) of the previous reference forward."""
    model = random_model(looped_config("TM"))
    seq, prompt_len, r = torch.randint(0, V, (2, 12)), 4, 3
    logits, _ = decode(model, seq, prompt_len, lambda t, u: r, Loops(r, warm_start=True))
    overrides: dict[int, torch.Tensor] = {}
    finals = []
    standard = model.loop.initial_state

    def initial_state(e, cache):
        s = standard(e, cache).clone()
        for t, state in overrides.items():
            if t < s.size(1):
                s[:, t] = state
        return s
    monkeypatch.setattr(model.loop, "initial_state", initial_state)
    model.blocks[3].register_forward_pre_hook(lambda module, args: finals.append(args[0]))
    for t in range(prompt_len, seq.size(1)):
        model(seq[:, :t], compute=Compute(loops=r))
        overrides[t] = finals[-1][:, t - 1]
    reference = model(seq, compute=Compute(loops=r))
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    overrides.clear()
    # it matters
    assert not torch.allclose(logits[:, prompt_len:], model(seq, compute=Compute(loops=r))[:, prompt_len:], atol=1e-3)


@torch.no_grad()
def test_kv_budget_shares_slots():
    """Enough budget is exact; a budget of one slot for r iterations keeps each token's latest write (the
    seeds' shared-slot scheme), which differs from the exact forward but is exact again at r = 1."""
    model = random_model(looped_config("TM"))
    seq = torch.randint(0, V, (2, 10))
    logits, _ = decode(model, seq, 3, lambda t, u: 3, Loops(3, kv_budget=5))
    torch.testing.assert_close(logits, model(seq, compute=Compute(loops=3)), atol=1e-5, rtol=1e-5)
    cache = InferenceCache(model, 2, 10, compute=Compute(loops=Loops(3, kv_budget=1)))
    assert cache.loop_slots == 1 and cache.loop_shared and len(cache.states[1]) == 1
    shared, _ = decode(model, seq, 3, lambda t, u: 3, Loops(3, kv_budget=1))
    assert shared.isfinite().all() and not torch.allclose(shared, model(seq, compute=Compute(loops=3)), atol=1e-3)
    one, _ = decode(model, seq, 3, lambda t, u: 1, Loops(3, kv_budget=1))
    torch.testing.assert_close(one, model(seq, compute=Compute(loops=1)), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_per_iteration_widths_decode_exactly_and_count_their_flops():
    """Narrow early iterations, full width later: a callable width per iteration, through the cache too."""
    config = dataclasses.replace(looped_config("T", recur=2), n_embd=64, n_head=4, n_kv_head=4)
    model = random_model(config)
    schedule = [16, 32, None, 16]

    def width(i):
        return schedule[i]
    seq = torch.randint(0, V, (2, 14))
    reference = model(seq, compute=Compute(width=width, loops=4))
    # the widths change the function
    assert not torch.allclose(reference, model(seq, compute=Compute(loops=4)), atol=1e-3)
    cache = InferenceCache(model, 2, 14, compute=Compute(loops=4))
    steps = [model(seq[:, :5], cache=cache, compute=Compute(width=width, loops=4))]
    steps += [model(seq[:, t:t + 1], cache=cache, compute=Compute(width=width, loops=4)) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, atol=1e-5, rtol=1e-5)
    full, narrow = model.count_flops(compute=Compute(loops=4)), model.count_flops(compute=Compute(width=width, loops=4))
    per_layer = {w: 2 * w * (3 * w) + 2 * w * w + 2 * 2 * w * 4 * w for w in (16, 32, 64)}  # q, k, v, o, MLP
    # two recurrent layers, each at 16 in iterations 0 and 3 and at 32 in iteration 1
    saved = 2 * (2 * (per_layer[64] - per_layer[16]) + per_layer[64] - per_layer[32])
    assert full.projections - narrow.projections == pytest.approx(saved)


@torch.no_grad()
def test_engine_generates_with_loops_like_full_recompute():
    model = random_model(looped_config("TM"))
    prompts = [[1, 2, 3], [7]]
    for loops in (2, Loops(8, exit="latent", threshold=1e-2)):
        rows = Engine(model).generate(prompts, 6, SamplingParams(temperature=0), compute=Compute(loops=loops))
        for prompt, row in zip(prompts, rows, strict=True):
            ids = list(prompt)
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]), compute=Compute(loops=loops))[0, -1].argmax()))
            assert row.tokens == ids[len(prompt):]


# --- FLOPs ---------------------------------------------------------------------------------------------------
def test_flop_counter_matches_a_hand_count():
    """Attention-only loop, full width: every layer costs 24 d^2 (q, k, v, o: 8 d^2; MLP 4d: 16 d^2) plus
    4 d keys-seen for attention; inject 2 d^2 per iteration and once for the input; lm_head 2 d V."""
    config = tiny_config(vocab_size=V, n_embd=32, n_head=2, sequence_len=16, block_pattern="T", n_layer=4,
                         loop=dict(prelude=1, recur=2, coda=1, mean_recurrence=4, backprop_depth=3))
    d, context = 32, 16
    keys = (context + 1) / 2  # causal: position t sees t + 1 keys
    layer = 24 * d * d + 4 * d * keys
    inject = 2 * d * d
    model = AdambaLM(config)
    for r, probes in [(1, 0), (4, 0), (6, 0), (6, 5)]:
        count = model.count_flops(compute=Compute(loops=r), probes=probes)
        forward = (2 + probes) * layer + 2 * r * layer + (r + 1) * inject + (1 + probes) * 2 * d * V
        no_grad = max(r - 3, 0) * (2 * layer + inject)
        assert count.forward == pytest.approx(forward)
        assert count.no_grad == pytest.approx(no_grad)
        assert count.train == pytest.approx(3 * forward - 2 * no_grad)  # backward for min(r, k) iterations
    assert model.count_flops() == model.count_flops(compute=Compute(loops=4))  # default: mean_recurrence


# --- training -------------------------------------------------------------------------------------------------
def test_training_loop_counts_are_a_pure_function_of_seed_step_and_micro_step():
    config = looped_config(mean_recurrence=4, r_max=10)
    draws = [sample_loops(config, 42, step, micro) for step in range(3000) for micro in range(2)]
    assert draws == [sample_loops(config, 42, step, micro) for step in range(3000) for micro in range(2)]
    assert draws != [sample_loops(config, 43, step, micro) for step in range(3000) for micro in range(2)]
    assert min(draws) == 1 and max(draws) == 10  # clamped to [1, r_max]
    assert statistics.mean(draws) == pytest.approx(4, abs=0.15)  # Poisson-lognormal of mean r-bar
    assert sample_loops(tiny_config(), 42, 0, 0) is None


def test_training_a_looped_model_logs_the_sampled_loops_and_reports_them(corpus_dir, adamba_home):
    from adamba.cli import main
    from adamba.train.trainer import train
    from tests.conftest import tiny_train_config

    config = looped_config("TM", mean_recurrence=3, backprop_depth=2)
    result = train(config, tiny_train_config(corpus_dir, num_iterations=3, total_batch_size=4 * 48), progress=False)
    logged = [m["loops"] for m in result.metrics if "loops" in m]
    expected = [sample_loops(config, 42, step, 0) for step in range(3)]
    assert logged == expected and result.mean_loops == pytest.approx(sum(expected) / 3)
    # the report of `adamba eval loops` on that checkpoint
    assert main(["eval", "loops", "test", "--tokens", "192", "--batch-size", "2", "--loops", "1,3", "--device",
                 "cpu"]) == 0
    out = adamba_home / "reports" / "test"
    report = (out / "loops.md").read_text()
    assert "exit kl < 0.0005 (r <= 3)" in report and (out / "loops.png").exists()
    interval = r"([\d.]+) \(([\d.]+)-([\d.]+)\)"
    # r = 3 is mean_recurrence: the control that every other row's paired difference is taken from
    assert re.search(rf"\| r = 3 \| 3.00 \| [\d.e+]+ \| 100.0% \| {interval} \| \(control\) \|", report)
    low, bpb, high = sorted(map(float, re.search(rf"\| r = 1 \| 1.00 \| [\d.e+]+ \| [\d.]+% \| {interval} \|",
                                                 report).groups()))
    assert low < bpb < high


def test_kill_and_resume_of_a_looped_model_with_random_initial_state_is_exact(corpus_dir, monkeypatch):
    """Random initial states draw from the global RNG every step, so an exact resume must restore that RNG."""
    from tests.conftest import straight_and_resumed_losses

    config = looped_config("T", init_state="random", init_sigma=1.0)
    straight, resumed = straight_and_resumed_losses(config, corpus_dir, monkeypatch, kill_after=3, num_iterations=6,
                                                    save_every=1, total_batch_size=4 * 48)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
