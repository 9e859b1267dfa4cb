"""RL on verifiable rewards: GRPO's arithmetic against hand computations, masks, learning a rigged reward, resume."""

import math

import pytest
import torch
from conftest import tiny_config, tiny_train_config

from adamba.chat.render import render_for_completion
from adamba.checkpoint import load_checkpoint, run_dir
from adamba.cli import main
from adamba.config import RL_TRAIN_DEFAULTS, RLConfig, TrainConfig
from adamba.infer.engine import Completion
from adamba.model.compute import Compute
from adamba.model.flops import count_flops
from adamba.surgery.add_predictor import with_width_predictor
from adamba.tasks.base import Items
from adamba.train.grpo import group_advantages, kl_k3, pass_at_k, policy_loss, token_logprobs
from adamba.train.rl import Rollout, _batch, _logprobs, answer_flops, rl, sample_rollouts, setup_rl
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


class AlwaysRight(FirstToken):
    """Rigged: every reply is right, so only the FLOPs price tells completions apart."""

    def __init__(self):
        super().__init__("")


def mean_level_probs(model, tokenizer, task) -> torch.Tensor:
    """The width predictor's level probabilities at its one choosable layer (1), averaged over the task's prompts."""
    prompts = [render_for_completion(tokenizer, task[i]) for i in range(len(task))]
    with torch.no_grad():
        return torch.stack([torch.softmax(model.adaptive_heads.predictor(model.hidden_after(torch.tensor([p]), 1)),
                                          -1)[0, 1] for p in prompts]).mean(0)


@pytest.mark.parametrize("price", [0.0, 4.0])
def test_a_flops_price_teaches_the_width_choice_to_spend_less(base, price):
    """Every answer is right: at price 0 all rewards tie, so the choice must not move from its uniform start (1/3
    per level, zero output weights); with a price the narrow widths earn more and their probability rises."""
    task = AlwaysRight()
    rl(*rl_configs(f"price{price:g}", steps=8, flops_price=price), task, task, progress=False)
    checkpoint = load_checkpoint(run_dir(f"price{price:g}"))
    probs = mean_level_probs(checkpoint.model, checkpoint.tokenizer, task)
    if price == 0:
        torch.testing.assert_close(probs, torch.full((3,), 1 / 3))
    else:
        assert probs[2] < 1 / 6 and probs[0] > 1 / 3, probs.tolist()  # levels 16, 32, 64: full width halved
    reports = run_dir("x").parent.parent / "reports"
    report = (reports / f"price{price:g}" / "rl.md").read_text()
    assert "| step | problems | n | pass@1 | FLOPs of full width | width 16 | width 32 | width 64 |" in report
    assert main(["eval", "rl", f"price{price:g}", "--name", "curve"]) == 0
    final = [r for r in load_metrics(f"price{price:g}") if "eval_flops_frac" in r][-1]
    assert f"| price{price:g} | {price:g} | 3 | 100.0% -> 100.0% | {final['eval_flops_per_answer']:.3g} | " \
           f"{100 * final['eval_flops_frac']:.1f}% |" in (reports / "curve" / "rl_price.md").read_text()


def load_metrics(run: str) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir(run) / "metrics.jsonl").read_text().splitlines()]


def test_the_price_curve_refuses_a_run_without_a_price(base, capsys):
    task = FirstToken("a")
    rl(*rl_configs("plain", steps=1), task, task, progress=False)
    assert main(["eval", "rl", "plain"]) == 2
    assert "plain was not compute-aware (no flops_price)" in capsys.readouterr().err


def test_compute_aware_log_probabilities_and_flops_by_reference(base):
    """The teacher-forced pass over rows at different sampled widths equals each row run alone at its widths; the
    width choice's log-probability is the predictor's log-softmax at the chosen level; the FLOPs are counted by hand
    from the counter's per-token figures."""
    rl_config, config = rl_configs("aware", flops_price=1.0)
    run = setup_rl(rl_config, config)
    model = run.model
    assert model.config.predictor_layers == 1 and run.reference is None
    task = FirstToken("a")
    rollouts = [r for group in sample_rollouts(run, task, [0, 1, 2], 4, seed=5) for r in group]
    assert len({r.choice.widths for r in rollouts}) > 1  # the batch mixes widths
    x, y, mask = _batch(rollouts, run.tokenizer.bos_id, run.device)
    with torch.no_grad():
        logp = _logprobs(run, model, x, y, rollouts)
    assert logp.shape == mask.shape == (len(rollouts), x.size(1) + 1)
    for b, r in enumerate(rollouts):
        tokens, _ = r.sequence()
        n = len(tokens) - 1
        with torch.no_grad():
            alone = token_logprobs(model(torch.tensor([tokens[:-1]]), compute=Compute(width=list(r.choice.widths))),
                                   torch.tensor([tokens[1:]]))
            scores = model.adaptive_heads.predictor(model.hidden_after(torch.tensor([r.prompt]), 1))[0]
        torch.testing.assert_close(logp[b, :n], alone[0], atol=1e-5, rtol=0)
        assert r.choice.levels[0] == 2  # layer 0 is read by the predictor: pinned to full width
        expected = torch.log_softmax(scores[1], -1)[r.choice.levels[1]]
        torch.testing.assert_close(logp[b, -1], expected, atol=1e-6, rtol=0)
        # FLOPs by hand: every token at the chosen widths, plus the predictor's pass (block 0 over the prompt,
        # then its MLP once: 2 (d h + h n_layer n_levels)), against the same tokens at full width
        c, L, P = model.config, len(r.prompt) + len(r.completion.tokens), len(r.prompt)
        block0 = count_flops(c, P, layers=[(0, "T", None, None)])
        mlp = 2 * (c.n_embd * c.predictor_hidden + c.predictor_hidden * c.n_layer * 3)
        spent = L * count_flops(c, L, c.layer_widths(list(r.choice.widths))).forward + \
            P * (block0.forward - block0.lm_head) + mlp
        assert r.flops == pytest.approx(spent) and answer_flops(model, P, L - P, r.choice)[0] == pytest.approx(spent)
        assert r.flops_frac == pytest.approx(spent / (L * count_flops(c, L).forward))
        # the price: against the prompt and the longest allowed answer (3 tokens) at full width
        longest = (P + 3) * count_flops(c, P + 3).forward
        assert r.reward == pytest.approx(float(r.correct) - spent / longest)


def test_adding_a_width_predictor_changes_no_logit(base):
    model = load_checkpoint(run_dir("base")).model
    grown = with_width_predictor(model)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x), grown(x))
        assert torch.equal(model(x, compute=Compute(width=[64, 32])), grown(x, compute=Compute(width=[64, 32])))
    with pytest.raises(ValueError, match="predictor_layers: the model already has"):
        with_width_predictor(grown)
    with pytest.raises(ValueError, match="flops_price"):
        RLConfig(base="base", flops_price=-1.0)


@pytest.mark.parametrize("overrides", [{}, {"ppo_epochs": 2, "minibatches": 2, "kl_coef": 0.1},
                                       {"flops_price": 0.5, "ppo_epochs": 2, "minibatches": 2, "kl_coef": 0.1}])
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


@pytest.mark.parametrize("extra", [[], ["--flops-price", "0.5"]])
def test_two_process_torchrun_stripes_rollouts_and_evaluation(base, extra):
    """`adamba rl` under torchrun: each rank samples its share of the problems, the held-out evaluation counts
    every problem once over both ranks, and rank 0 writes the checkpoint and the report; also compute-aware (the width
    predictor's gradients come from outside DDP's forward, in the same backward)."""
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
                           "--eval-samples", "2", "--eval-every", "0", "--device", "cpu", "--run-name", "ddp", *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(6 problems x 2 samples)") == 2  # at step 0 and at the end, both ranks' problems
    assert load_checkpoint(run_dir("ddp")).step == 2
    assert (run_dir("ddp").parent.parent / "reports" / "ddp" / "rl.png").exists()


def test_rl_under_fsdp_equals_it_under_ddp(base):
    """Sharded policy, whole reference, rollouts decoded by each rank's inference copy: the same rewards, held-out
    pass@k and weights as under DDP (tests/under_torchrun.py: a rigged checker, two passes of two minibatches and a
    KL penalty)."""
    from test_fsdp import fine_tune_under_fsdp_and_ddp

    records = fine_tune_under_fsdp_and_ddp("rl", "base", ("reward", "correct", "completion_tokens", "kl", "pass@1",
                                                           "pass@2"))
    assert 0 < records[1]["correct"] < 1  # the groups see both outcomes: the advantages are not all 0
    assert (load_checkpoint(run_dir("rl-fsdp")).path / "shards").is_dir()
    sharded, replicated = load_checkpoint(run_dir("rl-fsdp")).model, load_checkpoint(run_dir("rl-ddp")).model
    start = load_checkpoint(run_dir("base")).model
    moved = 0.0
    for (name, p), q, s in zip(sharded.named_parameters(), replicated.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=name)
        moved = max(moved, (p - s).abs().max().item())
    assert moved > 1e-3


def test_rl_under_fsdp_needs_torchrun_and_refuses_the_compute_aware_reward(base):
    from types import SimpleNamespace

    from adamba.train.rl import _check_fsdp

    rl_config, config = rl_configs("x")
    with pytest.raises(ValueError, match="fsdp: shards over the ranks of torchrun"):
        rl(rl_config, TrainConfig.from_dict({**config.to_dict(), "fsdp": True}), FirstToken("a"), FirstToken("a"),
           progress=False)
    with pytest.raises(ValueError, match="flops_price: compute-aware RL does not run under --fsdp"):
        _check_fsdp(RLConfig(base="base", flops_price=0.5), TrainConfig(fsdp=True), SimpleNamespace(enabled=True))
