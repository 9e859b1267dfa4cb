"""RL on verifiable rewards: GRPO's arithmetic against hand computations, masks, learning a rigged reward, resume."""

import math

import pytest
import torch
from conftest import tiny_config, tiny_train_config

from adamba.chat.render import render_for_completion
from adamba.checkpoint import load_checkpoint, run_dir
from adamba.config import RL_TRAIN_DEFAULTS, RLConfig, TrainConfig
from adamba.infer.engine import Completion
from adamba.tasks.base import Items
from adamba.train.grpo import group_advantages, kl_k3, pass_at_k, policy_loss
from adamba.train.rl import Rollout, _batch, rl
from adamba.train.trainer import train


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert group_advantages(rewards).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    scaled = group_advantages(rewards, scale_by_std=True)
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of 1, 0, 0, 1
    torch.testing.assert_close(scaled[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert scaled[1].abs().max() == 0  # a group that all agrees teaches nothing


def test_clipped_objective_and_its_gradient_by_hand():
    logp = torch.tensor([[-1.0, -0.5], [-2.0, -0.1]], requires_grad=True)
    old = torch.tensor([[-1.2, -0.5], [-1.0, -0.3]])
    advantages = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = policy_loss(logp, old, advantages, mask, normaliser=3.0, clip_low=0.2, clip_high=0.2)
    # token (0,0): ratio e^0.2 = 1.221 > 1.2, A = 1: min(1.221, 1.2) = 1.2 (clipped);  (0,1): ratio 1 -> 1
    # token (1,0): ratio e^-1 = 0.368, A = -0.5: min(-0.184, 0.8 * -0.5 = -0.4) = -0.4 (clipped); (1,1) masked
    assert loss.item() == pytest.approx(-(1.2 + 1.0 - 0.4) / 3)
    assert stats["clipped_tokens"] == 2
    loss.backward()
    # clipped tokens pass no gradient; (0,1): d/dlogp of -ratio * A / 3 = -1/3; the masked token none
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1 / 3], [0.0, 0.0]]))


def test_kl_penalty_is_zero_at_the_reference_and_k3_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    assert kl_k3(logp, logp).abs().max() == 0
    mask = torch.ones(1, 2, dtype=torch.bool)
    plain, _ = policy_loss(logp, logp, torch.tensor([0.7]), mask, 2.0)
    with_kl, stats = policy_loss(logp, logp, torch.tensor([0.7]), mask, 2.0, kl_coef=0.5, ref_logp=logp.clone())
    assert with_kl.item() == plain.item() and stats["kl_sum"] == 0
    assert kl_k3(torch.tensor([0.0]), torch.tensor([0.5])).item() == pytest.approx(math.exp(0.5) - 0.5 - 1)


def test_pass_at_k_by_hand():
    # 1 right of 4: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2; all wrong: 0; all right: 1
    assert pass_at_k([[True, False, False, False]], 1) == pytest.approx(0.25)
    assert pass_at_k([[True, False, False, False]], 2) == pytest.approx(0.5)
    assert pass_at_k([[False] * 4, [True] * 4], 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="pass@5"):
        pass_at_k([[True] * 4], 5)


def test_only_the_policys_choices_carry_loss_not_the_prompt_or_forced_tool_output():
    prompt = [1, 2, 3]
    # sampled 10, 11 (a call), forced 90, 91 (the tool's output), sampled 12, then the stop token 99
    done = Completion(tokens=[10, 11, 90, 91, 12], forced=[False, False, True, True, False], stop_token=99)
    x, y, mask = _batch([Rollout(prompt, done, True, 0.0, 1.0)], pad_id=0, device=torch.device("cpu"))
    assert x[0].tolist() == [1, 2, 3, 10, 11, 90, 91, 12]
    assert y[0].tolist() == [2, 3, 10, 11, 90, 91, 12, 99]
    assert [t for t, m in zip(y[0].tolist(), mask[0].tolist(), strict=True) if m] == [10, 11, 12, 99]


class FirstToken(Items):
    """Rigged: a reply is right when it starts with `text`."""

    def __init__(self, text: str, n: int = 8):
        items = [{"messages": [{"role": "user", "content": f"question {i}"},
                               {"role": "assistant", "content": "?"}]} for i in range(n)]
        super().__init__("first-token", "generative", items)
        self.text = text

    def evaluate(self, conversation, answer):
        return answer.startswith(self.text)


def first_token_probs(model, tokenizer, task) -> torch.Tensor:
    prompts = [render_for_completion(tokenizer, task[i]) for i in range(len(task))]
    with torch.no_grad():
        return torch.stack([torch.softmax(model(torch.tensor([p]))[0, -1], -1) for p in prompts]).mean(0)


@pytest.fixture
def base(corpus_dir):
    train(tiny_config(sequence_len=64), tiny_train_config(corpus_dir, run_name="base", num_iterations=20,
                                                          total_batch_size=4 * 64), progress=False)
    return "base"


def rl_configs(run: str, steps: int = 4, **overrides):
    rl_config = RLConfig(base="base", num_steps=steps, prompts_per_step=4, samples_per_prompt=8, max_new_tokens=3,
                         eval_every=0, eval_items=4, eval_samples=2, init_lr_frac=1.0, **overrides)
    config = TrainConfig.from_dict({**RL_TRAIN_DEFAULTS, "run_name": run, "device": "cpu", "seed": 3})
    return rl_config, config


def test_a_reward_for_one_token_raises_its_probability(base):
    checkpoint = load_checkpoint(run_dir("base"))
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    probe = FirstToken("")
    before = first_token_probs(model, tokenizer, probe)
    texts = [tokenizer.decode([t]) for t in range(tokenizer.vocab_size)]
    # a token the policy already picks now and then (so the groups see both outcomes) and whose text begins no
    # other token's, so the reward favours it alone
    token = next(t for t in before.argsort(descending=True).tolist() if 0.01 < before[t] < 0.3 and texts[t]
                 and sum(other.startswith(texts[t]) for other in texts) == 1)
    text = texts[token]
    task = FirstToken(text)
    rl(*rl_configs("rigged", steps=6), task, task, progress=False)
    after = first_token_probs(load_checkpoint(run_dir("rigged")).model, tokenizer, task)
    assert after[token] > 2 * before[token], (before[token].item(), after[token].item())


@pytest.mark.parametrize("overrides", [{}, {"ppo_epochs": 2, "minibatches": 2, "kl_coef": 0.1}])
def test_resumed_midway_equals_the_uninterrupted_run(base, overrides):
    task = FirstToken("a")
    straight = rl(*rl_configs("straight", **overrides), task, task, progress=False)
    rl_config, config = rl_configs("halves", **overrides)
    rl(rl_config, TrainConfig.from_dict({**config.to_dict(), "save_every": 2}), task, task, progress=False)
    final = load_checkpoint(run_dir("halves")).path  # drop the last checkpoint, as if killed after step 2
    for p in final.iterdir():
        p.unlink()
    final.rmdir()
    resumed = rl(rl_config, TrainConfig.from_dict({**config.to_dict(), "save_every": 2}), task, task, resume=True,
                 progress=False)
    a, b = load_checkpoint(run_dir("straight")).model, load_checkpoint(run_dir("halves")).model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert [r["step"] for r in resumed.metrics if "reward" in r] == [1, 2, 3, 4]
    rewards = [r["reward"] for r in straight.metrics if "reward" in r]
    assert len(rewards) == 4


def test_two_process_torchrun_stripes_rollouts_and_evaluation(base):
    """`adamba rl` under torchrun: each rank samples its share of the problems, the held-out evaluation counts
    every problem once over both ranks, and rank 0 writes the checkpoint and the report."""
    import os
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV
    from test_train import ROOT, _free_port

    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "adamba.cli", "rl",
                           "base", "--task", "counting", "--num-steps", "2", "--prompts-per-step", "4",
                           "--samples-per-prompt", "2", "--max-new-tokens", "3", "--eval-items", "6",
                           "--eval-samples", "2", "--eval-every", "0", "--device", "cpu", "--run-name", "ddp"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(6 problems x 2 samples)") == 2  # at step 0 and at the end, both ranks' problems
    assert load_checkpoint(run_dir("ddp")).step == 2
    assert (run_dir("ddp").parent.parent / "reports" / "ddp" / "rl.png").exists()
