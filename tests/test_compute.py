"""Compute: the one compute choice, parsed from users' strings and checked against the model in one place."""

import pytest
import torch
from conftest import tiny_config

from adamba import AdambaLM
from adamba.model.compute import Compute
from adamba.model.exits import Adaptive
from adamba.model.looped import Loops


def matryoshka_config(**overrides):
    # levels 16, 32, 64 (n_embd 64, 4 heads of 16); the T layers are 0 and 2
    return tiny_config(block_pattern="TMT", n_layer=3, **overrides)


def looped_config():
    return tiny_config(n_layer=3, loop=dict(prelude=1, recur=1, coda=1, mean_recurrence=3))


def test_width_strings_resolve_to_the_widths_written_by_hand():
    config = matryoshka_config()
    assert config.matryoshka_levels == [16, 32, 64]
    assert Compute.parse(config).layer_widths(config) == [None, None, None]
    assert Compute.parse(config, width="").layer_widths(config) == [None, None, None]
    assert Compute.parse(config, width="16").layer_widths(config) == [16, None, 16]
    assert Compute.parse(config, width=" Ghost ").layer_widths(config) == [16, None, 16]
    # a per-layer list; the Mamba layer and a width equal to n_embd both mean full width (None)
    assert Compute.parse(config, width="32,64,64").layer_widths(config) == [32, None, None]


def test_loop_and_adaptive_strings_become_the_policies_they_name():
    looped = looped_config()
    assert Compute.parse(looped, loops="8").loops == 8
    assert Compute.parse(looped, loops="kl").loops == Loops(None, exit="kl")
    assert Compute.parse(looped, loops="latent:16").loops == Loops(16, exit="latent")
    gated = matryoshka_config(min_exit_layer=1)
    assert Compute.parse(gated, adaptive="off").adaptive is None
    assert Compute.parse(gated, adaptive="calibrated").adaptive == Adaptive()
    assert Compute.parse(gated, adaptive="0.8").adaptive == Adaptive(threshold=0.8)
    assert Compute.parse(gated, adaptive="predictor").adaptive == Adaptive(predictor=True)
    # the seeds' policy expands only where the model has expansion gates
    assert Compute.parse(gated, adaptive="seeds").adaptive == Adaptive(threshold=0.95)
    expanding = tiny_config(block_pattern="TMTT", n_layer=4, min_exit_layer=1, expansion_gates=True)
    assert Compute.parse(expanding, adaptive="seeds").adaptive == Adaptive(threshold=0.95, expand=0.5)


@pytest.mark.parametrize("fields, message", [
    (dict(width="huge"), "^--mode: unknown compute mode 'huge'"),
    (dict(width="16,16"), "^--mode: a per-layer list needs 3 widths"),
    (dict(width="24"), "^--mode: 24 is not a Matryoshka level"),
    (dict(width="1,x,2"), "^--mode: '1,x,2' is not a comma-separated list"),
    (dict(loops="4"), r"^--loops: this model has no loop \(config.loop is None\)"),
    (dict(adaptive="sometimes"), "^--adaptive: 'sometimes' is not off, calibrated"),
])
def test_bad_strings_are_refused_naming_the_field_as_the_user_wrote_it(fields, message):
    names = {"width": "--mode", "loops": "--loops", "adaptive": "--adaptive"}
    with pytest.raises(ValueError, match=message):
        Compute.parse(matryoshka_config(), names=names, **fields)


def test_bad_loop_strings_and_choices_that_do_not_fit_the_model_are_refused():
    looped = looped_config()
    for text in ("sometimes", "kl:many", "kl:0"):
        with pytest.raises(ValueError, match="^loops"):
            Compute.parse(looped, loops=text)
    with pytest.raises(ValueError, match="^adaptive: early exit is not defined for looped models"):
        Compute(adaptive=Adaptive()).check(looped)
    with pytest.raises(ValueError, match="^loops: this model has no loop"):
        AdambaLM(matryoshka_config())(torch.zeros(1, 4, dtype=torch.long), compute=Compute(loops=2))


def test_a_parsed_choice_runs_what_the_same_choice_written_out_runs():
    """The parsed form is the written-out form: same logits and FLOPs as widths given per layer."""
    torch.manual_seed(0)
    config = matryoshka_config()
    model = AdambaLM(config).eval()
    for p in model.parameters():  # zero-initialised projections would make every width compute the same
        torch.nn.init.normal_(p, std=0.2)
    idx = torch.randint(0, config.vocab_size, (2, 12))
    parsed = Compute.parse(config, width="ghost")
    written = Compute([16, 64, 16])
    assert torch.equal(model(idx, compute=parsed), model(idx, compute=written))
    assert not torch.allclose(model(idx, compute=parsed), model(idx), atol=1e-3)
    assert model.count_flops(12, parsed) == model.count_flops(12, written)
    assert model.count_flops(12, parsed).forward < model.count_flops(12).forward
