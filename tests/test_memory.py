"""The memory plan (model/memory.py) against the bytes a real training step holds on the CPU."""

import pytest
import torch
from conftest import tiny_config

from adamba import AdambaLM, TrainConfig
from adamba.cli import main
from adamba.model.memory import GIB, plan_memory
from adamba.train.optim import build_optimizers


def measured_bytes(config, train_config) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) after one real optimizer step, summed over the tensors."""
    torch.manual_seed(0)
    model = AdambaLM(config)
    optimizers = build_optimizers(model, train_config)
    idx = torch.randint(0, config.vocab_size, (2, config.sequence_len + 1))
    logits = model(idx[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
    for opt in optimizers:
        opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(v.numel() * v.element_size() for opt in optimizers for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return weights, grads, state


@pytest.mark.parametrize("pattern", ["T", "TM", "M2"])
@pytest.mark.parametrize("muon", ["classic", "polar"])
def test_weights_gradients_and_optimizer_state_match_a_real_step(pattern, muon):
    config = tiny_config(block_pattern=pattern, n_kv_head=2, mamba2_headdim=16, value_embeds=None)
    train_config = TrainConfig(device_batch_size=2, total_batch_size=2 * 32, muon=muon)
    plan = plan_memory(config, train_config, gpus=1, compute_bytes=4)
    weights, grads, state = measured_bytes(config, train_config)
    for planned, real in ((plan.weights, weights), (plan.gradients, grads), (plan.optimizer, state)):
        assert planned == pytest.approx(real, rel=0.10)  # the acceptance band; in fact within AdamW's step counters
    assert plan.optimizer == pytest.approx(state, rel=1e-3)


def test_fsdp_shards_and_the_fit_decision():
    config = tiny_config(n_layer=4)
    plan = plan_memory(config, TrainConfig(device_batch_size=2, total_batch_size=64), gpus=4)
    ddp, fsdp = plan.ddp(), plan.fsdp()
    for part in ("weights", "gradients", "optimizer"):
        assert fsdp[part] == ddp[part] / 4
    assert fsdp["activations"] == ddp["activations"]  # data parallel either way: each GPU its own micro-batch
    block = sum(p.numel() for p in AdambaLM(config).blocks[0].parameters())
    largest = max(p.numel() for p in AdambaLM(config).param_groups()["matrix"])
    assert fsdp["gathered"] == 2 * 2 * block + 2 * 4 * largest  # two bf16 units in flight, Muon's whole matrix
    ddp_total, fsdp_total = sum(ddp.values()) / GIB, sum(fsdp.values()) / GIB
    between = (ddp_total + fsdp_total) / 2
    table = plan.table(between)
    assert "| DDP |" in table and table.splitlines()[2].endswith("| no |") and table.splitlines()[3].endswith("| yes |")
    with pytest.raises(ValueError, match="gpus: must be a positive integer"):
        plan_memory(config, TrainConfig(), gpus=0)


def test_plan_memory_command(capsys):
    assert main(["plan", "memory", "configs/transformer_d20.toml", "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "560,988,160 parameters" in out and "| FSDP over 8 |" in out


def test_surgery_plan_shows_the_memory_of_every_stage(capsys):
    from adamba.surgery.plan import dry_run, load_plan, start_config

    plan = load_plan("configs/plans/seeds_gpu.toml")
    assert main(["surgery", "plan", "configs/plans/seeds_gpu.toml", "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out.split("per-GPU memory")[1]
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert len(rows) == len(dry_run(plan))
    start = plan_memory(start_config(plan), plan.train_config(), 8)
    assert rows[0].startswith(f"| 0 | start | {sum(start.ddp().values()) / GIB:.1f} |")


def test_activation_checkpointing_keeps_each_blocks_input_and_one_block():
    config = tiny_config(n_layer=4)
    plain = plan_memory(config, TrainConfig(device_batch_size=2, total_batch_size=64), gpus=1)
    saving = plan_memory(config, TrainConfig(device_batch_size=2, total_batch_size=64, activation_checkpointing=True),
                         gpus=1)
    tokens, logits = 2 * 32, 2 * 4 * 2 * 32 * 512
    block = (plain.activations - logits) / 4  # four equal attention blocks
    assert saving.activations == pytest.approx(4 * tokens * 64 * 2 + block + logits)
    assert (saving.weights, saving.gradients, saving.optimizer) == (plain.weights, plain.gradients, plain.optimizer)
