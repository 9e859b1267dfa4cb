import json
import random

import pytest
import torch
from conftest import tiny_config, tiny_train_config

from adamba import AdambaLM
from adamba.checkpoint import load_checkpoint
from adamba.common import seed_everything
from adamba.model.flops import count_flops
from adamba.train.energy import choice_probs, expected_flops, level_costs
from adamba.train.matryoshka import micro_step_widths
from adamba.train.trainer import train


def test_expected_flops_of_a_fixed_choice_is_the_flop_count_of_that_choice():
    cfg = tiny_config(block_pattern="TMT", n_layer=3)  # levels 16, 32, 64
    rng = random.Random(0)
    for _ in range(10):
        widths = [rng.choice(cfg.matryoshka_levels) for _ in range(cfg.n_layer)]
        want = count_flops(cfg, 24, cfg.layer_widths(widths)).forward  # the counter on the joint choice
        assert expected_flops(cfg, choice_probs(cfg, widths), 24).item() == pytest.approx(want)


def test_expected_flops_is_differentiable_and_mamba_layers_cost_nothing_extra():
    cfg = tiny_config(block_pattern="TM")
    logits = torch.zeros(cfg.n_layer, len(cfg.matryoshka_levels), dtype=torch.float64, requires_grad=True)
    energy = expected_flops(cfg, logits.softmax(-1))
    energy.backward()
    assert logits.grad[0].abs().sum() > 0  # the attention layer's choice moves the expected FLOPs
    assert torch.count_nonzero(logits.grad[1]) == 0  # the Mamba layer always runs at full width
    full, savings = level_costs(cfg)
    assert full == count_flops(cfg).forward and (savings[0, :-1] < 0).all() and savings[0, -1] == 0
    with pytest.raises(ValueError, match="^probs"):
        expected_flops(cfg, torch.ones(3, 3))


def test_fixed_training_width_trains_only_its_slice_and_logs_spent_flops(corpus_dir, capsys):
    cfg = tiny_config()
    result = train(cfg, tiny_train_config(corpus_dir, run_name="ghost", num_iterations=2, width="ghost",
                                          energy_weight=0.1), progress=False)
    out = capsys.readouterr().out
    assert "widths are fixed" in out and "no gradient" in out and "energy_weight is ignored" in out
    model = load_checkpoint(result.checkpoint).model
    seed_everything(tiny_train_config(corpus_dir).seed)
    init = AdambaLM.build(model.config)  # the trainer's initial weights (same seed, built the same way)
    ghost = cfg.compute_modes["ghost"]
    for block, block0 in zip(model.blocks, init.blocks, strict=True):
        # (c_proj starts at zero, so it is the first matrix a step moves)
        assert not torch.equal(block.attn.c_proj.weight[:ghost, :ghost], block0.attn.c_proj.weight[:ghost, :ghost])
        assert torch.equal(block.attn.c_q.weight[ghost:], block0.attn.c_q.weight[ghost:])
        assert torch.equal(block.mlp.c_proj.weight[ghost:], block0.mlp.c_proj.weight[ghost:])
    records = [json.loads(line) for line in (result.checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    tokens = tiny_train_config(corpus_dir).total_batch_size
    ghost_flops = count_flops(model.config, None, model.config.layer_widths("ghost"))
    for r in steps:
        assert r["energy_flops"] == pytest.approx(ghost_flops.forward)
        assert r["train_flops"] == pytest.approx(ghost_flops.train * tokens)


def test_matryoshka_training_says_the_energy_has_no_gradient(corpus_dir, capsys):
    cfg = tiny_config()
    config = tiny_train_config(corpus_dir, run_name="mat", num_iterations=2, matryoshka=True)
    result = train(cfg, config, progress=False)
    out = capsys.readouterr().out
    assert "energy penalty: widths are sampled by the sandwich rule" in out and "no gradient" in out
    records = [json.loads(line) for line in (result.checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r.get("step") == 1 and "loss" in r)
    per_micro = config.device_batch_size * cfg.sequence_len
    accum = config.total_batch_size // per_micro
    spent = sum(count_flops(cfg, None, cfg.layer_widths(w)).train * per_micro
                for micro in range(accum) for w in micro_step_widths(cfg, config, 0, micro))
    assert step["train_flops"] == pytest.approx(spent)
    assert step["train_flops"] > count_flops(cfg).train * config.total_batch_size  # every slice costs extra


def test_fixed_width_and_matryoshka_exclude_each_other(corpus_dir):
    with pytest.raises(ValueError, match="^width"):
        tiny_train_config(corpus_dir, width="ghost", matryoshka=True)
    with pytest.raises(ValueError, match="^width: 24 is not a Matryoshka level"):
        train(tiny_config(), tiny_train_config(corpus_dir, width=24), progress=False)
