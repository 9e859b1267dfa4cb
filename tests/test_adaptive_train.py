"""Training adaptive compute (train/losses.py): exit losses, honest gate labels, the width predictor and its energy
penalty, and the trainer wiring (gates and predictor in the optimizer, logged terms)."""

import json

import pytest
import torch
from conftest import tiny_config, tiny_train_config

from adamba import AdambaLM, TrainConfig
from adamba.checkpoint import load_checkpoint
from adamba.model.compute import Compute
from adamba.train.energy import expected_flops
from adamba.train.losses import ExitTraining, PredictorTraining, check_adaptive_training, exit_weights
from adamba.train.optim import build_optimizers
from adamba.train.trainer import train

ADAPTIVE = dict(block_pattern="TMT", n_layer=3, min_exit_layer=1, predictor_layers=1)


def random_model(**overrides) -> AdambaLM:
    torch.manual_seed(0)
    model = AdambaLM(tiny_config(**(ADAPTIVE | overrides)))
    for name, p in model.named_parameters():
        if not name.endswith(("A_log", "dt_proj.bias", "mixer.D")):
            torch.nn.init.normal_(p, std=0.3)
    return model


def test_gate_and_predictor_parameters_are_in_the_optimizer():
    model = random_model(expansion_gates=True, block_pattern="TMTT", n_layer=4)
    config = TrainConfig(adaptive_lr=0.01)
    optimizers = build_optimizers(model, config)
    groups = {id(p): g for opt in optimizers for g in opt.param_groups for p in g["params"]}
    adaptive = list(model.adaptive_heads.parameters())
    names = [n for n, _ in model.adaptive_heads.named_parameters()]
    assert any(n.startswith("exit_gates.") for n in names) and any(n.startswith("expansion_gates.") for n in names)
    assert any(n.startswith("predictor.") for n in names)
    assert all(id(p) in groups and groups[id(p)]["lr"] == 0.01 for p in adaptive)
    assert len(groups) == len(list(model.parameters()))  # every parameter is optimized exactly once


def test_exit_weights_follow_the_layerskip_curriculum():
    model = tiny_config(n_layer=4, min_exit_layer=1)  # exits after blocks 1, 2, 3
    config = TrainConfig(exit_loss_weight=1.0, num_iterations=60, exit_curriculum_fraction=0.5)
    assert exit_weights(model, config, 0) == {3: 0.5}  # the last exit first
    assert exit_weights(model, config, 10) == {3: 0.5, 2: pytest.approx(1 / 3)}
    assert exit_weights(model, config, 20) == {3: 0.5, 2: pytest.approx(1 / 3), 1: pytest.approx(1 / 6)}
    flat = TrainConfig(exit_loss_weight=1.0, exit_curriculum="none")
    assert exit_weights(model, flat, 0) == {1: pytest.approx(1 / 6), 2: pytest.approx(1 / 3), 3: 0.5}


def test_exit_and_gate_losses_use_the_truncated_models_and_the_honest_label():
    model = random_model()
    config = TrainConfig(exit_loss_weight=0.5, gate_loss_weight=2.0, exit_curriculum="none")
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    objective = ExitTraining(model.config, config, 0, narrow=False)
    loss = objective.loss(model, model, x, y, Compute())
    final = model(x)
    ce = torch.nn.functional.cross_entropy(final.flatten(0, 1), y.flatten())
    exit_ce = {k: torch.nn.functional.cross_entropy(model(x, exit_layers=torch.full((2, 16), k)).flatten(0, 1),
                                                    y.flatten()) for k in (1, 2)}
    bce, agree = 0.0, []
    for k in (1, 2):
        label = (model(x, exit_layers=torch.full((2, 16), k)).argmax(-1) == final.argmax(-1)).float()
        agree.append(label.mean())
        gate = model.adaptive_heads.exit_gates[str(k)](_hidden(model, x, k))
        bce += torch.nn.functional.binary_cross_entropy_with_logits(gate, label) / 2
    want = ce + 0.5 * (exit_ce[1] / 3 + exit_ce[2] * 2 / 3) + 2.0 * bce
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert objective.terms["exit_agreement"] == pytest.approx(float(sum(agree) / 2))
    loss.backward()
    gates = model.adaptive_heads.exit_gates
    assert all(gates[k].out.weight.grad.abs().sum() > 0 for k in ("1", "2"))
    # the gate input is detached: with only the gate loss, no block of the language model gets a gradient
    model.zero_grad()
    only_gates = ExitTraining(model.config, TrainConfig(gate_loss_weight=1.0), 0, narrow=False)
    only_gates.loss(model, model, x, y, Compute()).backward()
    ce_only = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
               and not n.startswith("adaptive_heads")}
    model.zero_grad()
    model(x, y).backward()
    for n, g in ce_only.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[n].grad)


def _hidden(model: AdambaLM, x: torch.Tensor, k: int) -> torch.Tensor:
    """x_k of a plain forward: the input of block k."""
    h = torch.nn.functional.rms_norm(model.wte(x), (model.config.n_embd,))
    for block in model.blocks[:k]:
        h = block(h, model.context(x.size(1)))
    return h


def test_the_energy_penalty_moves_the_predictor_toward_cheaper_widths():
    model = random_model()
    config = TrainConfig(predictor_weight=1.0, energy_weight=100.0, predictor_context=8)
    x, y = torch.randint(0, 512, (4, 32)), torch.randint(0, 512, (4, 32))
    predictor = model.adaptive_heads.predictor
    opt = torch.optim.Adam(predictor.parameters(), lr=0.05)

    def chosen_flops() -> float:
        with torch.no_grad():
            h = model.blocks[0](_hidden(model, x, 0), model.context(32))
            probs = torch.nn.functional.one_hot(predictor(h[:, :8]).argmax(-1), 3).double()
        return float(expected_flops(model.config, probs).mean())

    before = chosen_flops()
    for i in range(20):
        opt.zero_grad()
        objective = PredictorTraining(model.config, config)
        objective.loss(model, model, x, y, Compute()).backward()
        if i == 0:  # the energy term and the CE reach the predictor (later its softmax saturates)
            assert predictor.out.weight.grad.abs().sum() > 0
        opt.step()
    assert chosen_flops() < before
    assert 0 < objective.terms["predictor_flops_frac"] < 1


def test_adaptive_terms_need_their_modules():
    plain = tiny_config()
    for field, message in (("exit_loss_weight", "need exit layers"), ("gate_loss_weight", "has no gates"),
                           ("predictor_weight", "has no width predictor")):
        with pytest.raises(ValueError, match=f"^{field}: .*{message}"):
            check_adaptive_training(plain, TrainConfig(**{field: 1.0}))
    with pytest.raises(ValueError, match="^gate_label"):
        TrainConfig(gate_label="mse")


def test_training_with_exits_gates_and_predictor(corpus_dir, capsys):
    config = tiny_train_config(corpus_dir, run_name="adaptive", num_iterations=3, matryoshka=True,
                               exit_loss_weight=1.0, gate_loss_weight=1.0, predictor_weight=1.0, energy_weight=0.5,
                               predictor_context=8, exit_curriculum="none")
    result = train(tiny_config(**ADAPTIVE), config, progress=False)
    assert "so expected FLOPs has a gradient" in capsys.readouterr().out
    records = [json.loads(line) for line in (result.checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all({"exit_ce", "gate_bce", "exit_agreement", "predictor_ce", "predictor_flops_frac"} <= set(r)
               for r in steps)
    model = load_checkpoint(result.checkpoint).model
    heads = model.adaptive_heads
    # zero-initialised output layers moved: the optimizer trained the gates and the predictor
    assert all(gate.out.weight.abs().sum() > 0 for gate in heads.exit_gates.values())
    assert heads.predictor.out.weight.abs().sum() > 0
