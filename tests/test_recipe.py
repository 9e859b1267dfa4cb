"""Today's nanochat recipe (model/recipe.py, value embeddings in attention.py) keeps adamba's invariants: its
initial values are nanochat's, decode equals the full forward at every width (smear state included), surgery keeps
the logits, and a killed run resumes exactly. The logits of the recipe against an independent implementation of
nanochat's forward are in test_nanochat.py; batched right-padded rows in test_engine.py; speculative rollback in
test_speculative.py; the Matryoshka slice of a block with value embeddings in test_matryoshka.py."""

import dataclasses

import pytest
import torch
from conftest import straight_and_resumed_losses, tiny_config

from adamba import AdambaLM, ModelConfig
from adamba.model.cache import InferenceCache
from adamba.model.compute import Compute
from adamba.surgery.add_mamba import add_mamba
from adamba.surgery.deepen import deepen
from adamba.surgery.growth import max_logit_change
from adamba.surgery.widen import widen

# every option of today's recipe at once
RECIPE = dict(residual_scalars=True, value_embeds="alternating", smear=True, backout=True, qk_scale=1.2)


def random_recipe_model(**overrides) -> AdambaLM:
    """float64, every weight random (so no option is the identity and a cache error cannot hide)."""
    torch.manual_seed(0)
    model = AdambaLM(tiny_config(**{**RECIPE, **overrides})).double().eval()
    for name, p in model.named_parameters():
        if not name.endswith(("A_log", "dt_proj.bias", "dt_bias", "mixer.D")):
            torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():  # residual scales near nanochat's, so 4 layers neither vanish nor blow up
        model.scalars.resid.uniform_(0.8, 1.2)
    return model


def test_config_resolves_the_options_and_names_bad_values():
    config = tiny_config(block_pattern="TTMT", n_layer=4, value_embeds="alternating", backout=True)
    assert config.value_embed_layers == [0, 3]  # every other attention layer back from the last (2 is Mamba)
    assert tiny_config(n_layer=5, value_embeds="alternating").value_embed_layers == [0, 2, 4]  # nanochat's
    assert tiny_config(n_layer=4, block_pattern="TM", value_embeds="alternating").value_embed_layers == [2]
    assert config.backout_at == 2  # n_layer // 2, as nanochat
    # the fields keep what was asked, so a config derived with other layers alternates over its own
    assert dataclasses.replace(config, n_layer=2, block_pattern="TM").value_embed_layers == [0]
    assert tiny_config(value_embeds="1,0").value_embeds == [0, 1]  # a flag's list
    with pytest.raises(ValueError, match=r"value_embeds: layers \[1\] are not attention layers"):
        tiny_config(block_pattern="TM", value_embeds=[1])
    with pytest.raises(ValueError, match="value_embeds: must be \"alternating\" or a list"):
        tiny_config(value_embeds="every")
    with pytest.raises(ValueError, match="backout_layer: must be a layer index in \\[0, 1\\]"):
        tiny_config(backout=True, backout_layer=2)
    with pytest.raises(ValueError, match="smear: the gate reads 24 channels"):
        ModelConfig(vocab_size=64, n_embd=16, n_head=2, n_layer=1, sequence_len=16, smear=True)
    with pytest.raises(ValueError, match="qk_scale: must be > 0"):
        tiny_config(qk_scale=0)
    with pytest.raises(ValueError, match="smear: must be true or false"):
        tiny_config(smear="yes")


def test_initial_values_are_nanochats():
    model = AdambaLM(tiny_config(n_layer=4, **RECIPE))
    depth = torch.arange(4) / 3
    torch.testing.assert_close(model.scalars.resid.data, 1.15 - 0.10 * depth)
    torch.testing.assert_close(model.scalars.x0.data, 0.20 - 0.15 * depth)
    assert model.smear.scale.item() == 0.0 and model.backout.scale.item() == pytest.approx(0.2)
    gate = model.smear.gate.weight
    assert gate.shape == (1, 24) and 0 <= gate.min() and gate.max() <= 0.02 and gate.std() > 0
    for i in (1, 3):
        attn = model.blocks[i].attn
        gate = attn.ve_gate.weight
        assert gate.shape == (4, 12) and 0 <= gate.min() <= gate.max() <= 0.02
        assert attn.value_embed.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.1)
    assert model.blocks[0].attn.value_embed is None and model.blocks[2].attn.value_embed is None
    groups = model.param_groups()
    assert any(p is model.blocks[1].attn.value_embed.weight for p in groups["embedding"])
    assert all(any(p is q for q in groups["scalar"]) for p in
               [model.scalars.resid, model.scalars.x0, model.smear.scale, model.smear.gate.weight, model.backout.scale])
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("pattern", ["TT", "TMTM2"])
@pytest.mark.parametrize("static", [False, True], ids=["cache", "static-cache"])
@torch.no_grad()
def test_decode_equals_full_forward_at_every_mode(pattern, static):
    model = random_recipe_model(block_pattern=pattern, n_layer=len(pattern.replace("M2", "X")), n_kv_head=2,
                                mamba2_headdim=16)
    idx = torch.randint(0, 512, (2, 20))
    for mode in model.config.compute_modes:
        reference = model(idx, compute=Compute(mode))
        cache = InferenceCache(model, 2, 20, static=static)
        out = [model(idx[:, :7], cache=cache, compute=Compute(mode))]
        out += [model(idx[:, t:t + 1], cache=cache, compute=Compute(mode)) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(out, 1), reference, atol=1e-10, rtol=1e-10)
    # each option matters: without it the logits differ
    plain = random_recipe_model(block_pattern=pattern, n_layer=len(pattern.replace("M2", "X")), n_kv_head=2,
                                mamba2_headdim=16, smear=False)
    assert (plain(idx) - model(idx)).abs().max() > 1e-2


@pytest.mark.parametrize("grow", ["deepen", "add-mamba", "widen"])
@torch.no_grad()
def test_surgery_keeps_the_logits(grow):
    model = random_recipe_model(block_pattern="TT", n_layer=2, n_kv_head=2)
    if grow == "deepen":
        grown, new = deepen(model, "TMTT")  # the old blocks go to 0 and 2, with their options
        assert (model.config.value_embed_layers, model.config.backout_at) == ([1], 1)
        assert (grown.config.value_embed_layers, grown.config.backout_at, new) == ([2], 2, [1, 3])
    elif grow == "add-mamba":
        grown, new = add_mamba(model)
    else:
        grown = widen(model, 128, init="lora")
    assert max_logit_change(model, grown) < 1e-9
    if grow != "widen":  # the new blocks start as the identity, their residual scalars too
        assert all(grown.scalars.resid[i] == 1 and grown.scalars.x0[i] == 0 for i in new)
    idx = torch.randint(0, 512, (1, 12))
    cache = InferenceCache(grown, 1, 12)
    steps = [grown(idx[:, :5], cache=cache)] + [grown(idx[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), grown(idx), atol=1e-9, rtol=1e-9)


def test_kill_and_resume_is_exact_with_the_recipe_and_polar_muon(corpus_dir, monkeypatch):
    straight, resumed = straight_and_resumed_losses(tiny_config(block_pattern="TM", **RECIPE), corpus_dir, monkeypatch,
                                                    kill_after=3, num_iterations=6, save_every=1,
                                                    total_batch_size=2 * 4 * 32, muon="polar")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    assert straight[6] < straight[1]


def test_flop_counter_adds_the_recipes_gates_by_hand():
    plain = tiny_config(block_pattern="TTMT", n_layer=4, n_kv_head=2)
    recipe = tiny_config(block_pattern="TTMT", n_layer=4, n_kv_head=2, **RECIPE)
    assert recipe.value_embed_layers == [0, 3]
    # smear's gate (24 -> 1) once per token; each value-embedding layer's gate (12 -> 2 K/V heads); the residual
    # scalars and backout are elementwise, the tables lookups: neither is counted
    hand = 2 * 24 + 2 * (2 * 12 * 2)
    assert AdambaLM(recipe).count_flops().forward - AdambaLM(plain).count_flops().forward == hand
    narrow = Compute(16)  # width 16: one query head, so one K/V head's gate
    assert AdambaLM(recipe).count_flops(compute=narrow).forward - \
        AdambaLM(plain).count_flops(compute=narrow).forward == 2 * 24 + 2 * (2 * 12 * 1)


def _decode(model, idx, compute, prompt=6, **cache_options):
    """Prefill idx[:, :prompt], then one token at a time: every call's ForwardOutput."""
    cache = InferenceCache(model, idx.size(0), idx.size(1), compute=compute, **cache_options)
    steps = [model(idx[:, :prompt], cache=cache, compute=compute, outputs=True)]
    return steps + [model(idx[:, t:t + 1], cache=cache, compute=compute, outputs=True)
                    for t in range(prompt, idx.size(1))]


@pytest.mark.parametrize("backout_layer", [0, 1, 3], ids=["prelude", "recurrent", "coda"])
@torch.no_grad()
def test_looped_decode_equals_full_forward_with_the_recipe(backout_layer):
    """Residual scalars apply before every pass of a looped layer; smear and value embeddings read the tokens;
    backout takes its layer's latest run -- a recurrent layer's last iteration of each token, also when tokens stop
    at different counts (adaptive exit), as decoding each token alone does."""
    from adamba.model.looped import Loops

    model = random_recipe_model(block_pattern="TMTTT", n_layer=5, loop=dict(prelude=1, recur=2, coda=2,
                                                                            mean_recurrence=3),
                                backout_layer=backout_layer)
    with torch.no_grad():
        model.backout.scale.fill_(0.7)  # far from its init, so a wrong residual shows
    idx = torch.randint(0, 512, (2, 20))
    for loops in (1, 3):
        full = model(idx, compute=Compute(loops=loops))
        steps = _decode(model, idx, Compute(loops=loops))
        torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), full, atol=1e-10, rtol=1e-10)
    adaptive = Compute(loops=Loops(6, exit="latent", threshold=0.8))
    steps = _decode(model, idx, adaptive)
    counts = torch.cat([s.loops for s in steps], 1)
    assert len(counts.unique()) > 1  # tokens stopped at different iterations
    torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), model(idx, compute=Compute(loops=counts)),
                               atol=1e-10, rtol=1e-10)
    # the backout is in the output: without it the logits differ
    with torch.no_grad():
        model.backout.scale.zero_()
    assert not torch.allclose(model(idx, compute=Compute(loops=counts)), torch.cat([s.logits for s in steps], 1))


@torch.no_grad()
def test_exit_heads_back_out_as_a_token_frozen_at_their_layer_does():
    """The exit loss (train/losses.py) equals the cross-entropy of the full forward with every token exiting at
    each exit layer k; and, by hand, that forward's logits are head(h_k - lambda h_{b+1}) after the backout layer
    b and head(h_k) at or before it (the final norm is scale-free)."""
    import torch.nn.functional as F

    from adamba.config import TrainConfig
    from adamba.train.losses import ExitTraining

    model = random_recipe_model(block_pattern="TMTT", n_layer=4, min_exit_layer=1, backout_layer=1)
    with torch.no_grad():
        model.backout.scale.fill_(0.6)
    idx, targets = torch.randint(0, 512, (2, 12)), torch.randint(0, 512, (2, 12))
    exits = ExitTraining(model.config, TrainConfig(exit_loss_weight=1.0, exit_curriculum="none"), step=0,
                         narrow=False)
    exits.loss(model, model, idx, targets, Compute())
    assert sorted(exits.weights) == [1, 2, 3]  # one exit at the backout layer, two after it
    h = model(idx, hidden_layers=range(4), outputs=True).hidden
    expected = 0.0
    for k, weight in exits.weights.items():
        frozen = model(idx, exit_layers=torch.full(idx.shape, k))
        by_hand = model.head(h[k] - 0.6 * h[2]) if k > 1 else model.head(h[k])
        torch.testing.assert_close(frozen, by_hand, atol=1e-6, rtol=1e-6)
        expected += weight * F.cross_entropy(frozen.view(-1, frozen.size(-1)), targets.view(-1)).item()
    assert exits.terms["exit_ce"] == pytest.approx(expected, rel=1e-9)


@torch.no_grad()
def test_decode_with_gated_exits_equals_the_full_forward_with_the_same_decisions():
    """An exited token's residual is frozen: the residual scalars leave it alone, later layers' value embeddings
    still enter the K/V it leaves for other tokens (CALM's state propagation)."""
    from adamba.model.exits import Adaptive

    model = random_recipe_model(block_pattern="TMTT", n_layer=4, min_exit_layer=1, backout_layer=1)
    policy = Adaptive(threshold=0.6)
    idx = torch.randint(0, 512, (3, 24))
    cache = InferenceCache(model, 3, 24)
    steps = [model(idx[:, :6], cache=cache, compute=Compute(adaptive=policy), outputs=True)]
    steps += [model(idx[:, t:t + 1], cache=cache, compute=Compute(adaptive=policy), outputs=True)
              for t in range(6, 24)]
    decisions = torch.cat([s.exits.exit_layer for s in steps], dim=1)
    assert len(decisions.unique()) > 1  # tokens exit at different layers
    reference = model(idx, exit_layers=decisions)
    torch.testing.assert_close(torch.cat([s.logits for s in steps], dim=1), reference, atol=1e-10, rtol=1e-10)
