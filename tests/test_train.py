import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_ENV, tiny_config, tiny_train_config

from adamba import AdambaLM
from adamba.checkpoint import load_checkpoint, run_dir
from adamba.data.corpus import local_corpus
from adamba.data.dataset import TokenizedCorpus
from adamba.data.loader import DataLoader
from adamba.eval.bpb import evaluate_bpb
from adamba.train.optim import lr_multiplier
from adamba.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_FLAGS = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--sequence-len", "32"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adamba.cli", *args]


def train_flags(corpus_dir, run: str, **overrides) -> list[str]:
    cfg = tiny_train_config(corpus_dir, run_name=run, **overrides)
    flags = [*TINY_MODEL_FLAGS]
    for key in ("run_name", "data", "tokenizer_vocab_size", "device_batch_size", "total_batch_size", "num_iterations",
                "eval_every", "eval_tokens", "device", "val_fraction", "save_every", "seed"):
        flags += [f"--{key.replace('_', '-')}", str(getattr(cfg, key))]
    return flags


def losses(run: str) -> dict[int, float]:
    lines = (run_dir(run) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_training_lowers_val_bpb(corpus_dir):
    result = train(tiny_config(), tiny_train_config(corpus_dir, num_iterations=30, eval_every=15,
                                                    total_batch_size=8 * 32), progress=False)
    assert result.step == 30 and result.initial_val_bpb > 1.2 * result.final_val_bpb
    ck = load_checkpoint(result.checkpoint)
    assert ck.step == 30 and ck.meta["loader"]["batch"] > 0


def test_kill_and_resume_matches_uninterrupted_run(corpus_dir):
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    n = 40
    # grad accumulation makes each step slow enough to kill the process part-way through
    common = dict(num_iterations=n, save_every=1, total_batch_size=16 * 4 * 32)
    proc = subprocess.Popen(cli("train", *train_flags(corpus_dir, "killed", **common)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run_dir("killed") / "step_000003").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run_dir("killed")).step
    assert 3 <= killed_at < n
    resumed = subprocess.run(cli("train", "--resume", *train_flags(corpus_dir, "killed", **common)), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming killed from" in resumed.stdout
    train(tiny_config(), tiny_train_config(corpus_dir, run_name="straight", **common), progress=False)
    straight, after_resume = losses("straight"), losses("killed")
    assert sorted(after_resume) == list(range(1, n + 1))
    for step in range(1, n + 1):
        assert after_resume[step] == pytest.approx(straight[step], abs=1e-6), step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun_step_equals_single_process(corpus_dir):
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    common = dict(num_iterations=2, device_batch_size=2, total_batch_size=4 * 32)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "adamba.cli", "train",
                          *train_flags(corpus_dir, "ddp", **common)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 rank(s) x 1 micro-steps" in ddp.stdout
    train(tiny_config(), tiny_train_config(corpus_dir, run_name="single", **common), progress=False)
    assert "2 rank" not in (run_dir("single") / "metrics.jsonl").read_text()
    a, b = load_checkpoint(run_dir("ddp")).model, load_checkpoint(run_dir("single")).model
    assert losses("ddp")[1] == pytest.approx(losses("single")[1], abs=1e-6)
    # DDP sums gradients in another order, so they differ in their last float32 bits; Muon's float32 Newton-
    # Schulz (train/optim.py) amplifies that somewhat, AdamW does not: both must still agree to float32 noise.
    muon_atol = 1e-4
    moved = 0.0
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        muon = name.startswith("blocks.") and p.ndim == 2
        torch.testing.assert_close(p, q, atol=muon_atol if muon else 2e-5, rtol=0, msg=name)
        moved = max(moved, (p - AdambaLM.build(a.config).state_dict()[name]).abs().max().item())
    assert moved > 1e-3  # the steps really changed the weights


def test_torchrun_trains_a_model_whose_gates_and_predictor_the_plain_loss_leaves_unused(corpus_dir):
    """Gates and a width predictor get no gradient from the plain loss; DDP must not wait for theirs at step 2."""
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    common = dict(num_iterations=2, device_batch_size=2, total_batch_size=4 * 32)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "adamba.cli", "train",
                          *train_flags(corpus_dir, "gated", **common), "--block-pattern", "TT",
                          "--min-exit-layer", "1", "--predictor-layers", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert sorted(losses("gated")) == [1, 2]
    ck = load_checkpoint(run_dir("gated"))
    assert ck.step == 2 and ck.model.adaptive_heads is not None


def test_bpb_of_uniform_model_is_log_vocab_per_byte(corpus_dir, tokenizer):
    """With a zero lm_head every token costs ln(V) nats; count the bytes independently by decoding."""
    data = TokenizedCorpus(local_corpus(corpus_dir), tokenizer, val_fraction=0.3, progress=False)
    model = AdambaLM.build(tiny_config())
    bpb = evaluate_bpb(model, data, batch_size=2, seq_len=32, max_tokens=4 * 32, device=torch.device("cpu"))
    loader = DataLoader(data, "val", 2, 32, shuffle=False)
    n_tokens = n_bytes = 0
    for _ in range(2):
        _, y = next(loader)
        for token in y.reshape(-1).tolist():
            if token != tokenizer.bos_id:
                n_tokens += 1
                n_bytes += len(tokenizer.enc.decode_single_token_bytes(token))
    assert bpb == pytest.approx(n_tokens * math.log(512) / (math.log(2) * n_bytes), rel=1e-6)  # float32 loss


def test_lr_schedule_shape():
    from adamba import TrainConfig

    cfg = TrainConfig(num_iterations=100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1) and lr_multiplier(9, cfg) == 1.0
    assert lr_multiplier(50, cfg) == 1.0 and lr_multiplier(80, cfg) == 1.0
    assert lr_multiplier(90, cfg) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)


def test_batch_that_does_not_divide_is_an_error(corpus_dir):
    with pytest.raises(ValueError, match="total_batch_size"):
        train(tiny_config(), tiny_train_config(corpus_dir, total_batch_size=100), progress=False)


def test_time_budget_refits_num_iterations_without_changing_past_steps():
    from adamba import TrainConfig
    from adamba.train.trainer import fit_to_budget

    cfg = TrainConfig(num_iterations=1000, warmdown_ratio=0.2)
    fitted = fit_to_budget(cfg, 1000, step=5, start_step=0, seconds_per_step=2.0, remaining=200.0)
    assert fitted.num_iterations == 105
    assert all(lr_multiplier(s, fitted) == lr_multiplier(s, cfg) for s in range(6))
    longer = fit_to_budget(fitted, 1000, step=20, start_step=0, seconds_per_step=1.0, remaining=400.0)
    assert longer.num_iterations == 420  # a faster machine than first measured gets more steps, up to the cap
    assert fit_to_budget(fitted, 1000, step=20, start_step=0, seconds_per_step=0.01, remaining=400).num_iterations \
        == 1000
    warm = TrainConfig(num_iterations=1000, warmup_ratio=0.1)  # the warmup length would move: keep the plan
    assert fit_to_budget(warm, 1000, step=5, start_step=0, seconds_per_step=2.0, remaining=200.0) == warm
