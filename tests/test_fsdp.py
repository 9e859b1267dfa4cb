"""FSDP2 (train/fsdp.py) on the CPU with gloo, 2 processes: a step equals one process's step on the same global
batch, a killed run resumes exactly, and its checkpoint (gathered whole) loads in one process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SUBPROCESS_ENV, tiny_config, tiny_train_config
from test_train import ROOT, _free_port, losses, train_flags

from adamba import AdambaLM
from adamba.checkpoint import load_checkpoint, run_dir
from adamba.train.trainer import train


def env() -> dict:  # read when a test runs: the adamba_home fixture has set $ADAMBA_HOME by then
    return {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}


def torchrun(*args: str) -> list[str]:
    return [*under_torchrun()[:-1], "-m", "adamba.cli", *args]


def under_torchrun(*args: str) -> list[str]:
    """tests/under_torchrun.py (fine-tuning with a rigged checker) in 2 processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(ROOT / "tests" / "under_torchrun.py"),
            *args]


@pytest.mark.parametrize("muon", ["classic", "polar"])
def test_two_process_fsdp_steps_equal_one_process(corpus_dir, muon):
    # the classic run clips the gradient norm (over all shards), the polar one recomputes its activations in the
    # backward: neither may change the result
    common = dict(num_iterations=2, device_batch_size=2, total_batch_size=4 * 32, eval_every=2,
                  grad_clip=0.5 if muon == "classic" else 0.0)
    flags = ["--block-pattern", "TM", "--muon", muon, "--activation-checkpointing", str(muon == "polar").lower(),
             "--grad-clip", str(common["grad_clip"])]
    run = subprocess.run(torchrun("train", *train_flags(corpus_dir, f"fsdp-{muon}", **common), *flags, "--fsdp",
                                  "true"), env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 rank(s) x 1 micro-steps" in run.stdout
    train(tiny_config(block_pattern="TM"), tiny_train_config(corpus_dir, run_name=f"one-{muon}", muon=muon, **common),
          progress=False)
    sharded, single = load_checkpoint(run_dir(f"fsdp-{muon}")).model, load_checkpoint(run_dir(f"one-{muon}")).model
    for step in (1, 2):
        assert losses(f"fsdp-{muon}")[step] == pytest.approx(losses(f"one-{muon}")[step], abs=1e-5)
    records = (run_dir(f"fsdp-{muon}") / "metrics.jsonl").read_text().splitlines()
    evaluated = [r["step"] for r in map(json.loads, records) if "val_bpb" in r]
    assert evaluated == [0, 2]  # evaluation runs on the sharded model too (every rank takes part)
    # float32 throughout; reduce-scatter sums the two ranks' gradients in another order than one process's
    # backward, and Muon's orthogonalisation amplifies those last bits a little (as for DDP in test_train.py)
    moved = 0.0
    fresh = AdambaLM.build(single.config).state_dict()
    for (name, p), q in zip(sharded.named_parameters(), single.parameters(), strict=True):
        muon_param = name.startswith("blocks.") and p.ndim == 2
        torch.testing.assert_close(p, q, atol=1e-4 if muon_param else 2e-5, rtol=0, msg=name)
        moved = max(moved, (p - fresh[name]).abs().max().item())
    assert moved > 1e-3


def test_fsdp_kill_and_resume_is_exact_and_its_checkpoint_loads_in_one_process(corpus_dir):
    n = 8
    common = dict(num_iterations=n, save_every=1, device_batch_size=2, total_batch_size=2 * 2 * 32 * 4,
                  muon="polar")
    flags = [*train_flags(corpus_dir, "straight", **common), "--fsdp", "true", "--muon", "polar"]
    straight = subprocess.run(torchrun("train", *flags), env=env(), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    flags = [*train_flags(corpus_dir, "killed", **common), "--fsdp", "true", "--muon", "polar"]
    proc = subprocess.Popen(torchrun("train", *flags), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (run_dir("killed") / "step_000003").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    killed_at = load_checkpoint(run_dir("killed")).step
    assert 3 <= killed_at < n
    resumed = subprocess.run(torchrun("train", "--resume", *flags), env=env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming killed from" in resumed.stdout
    a, b = losses("straight"), losses("killed")
    assert sorted(b) == list(range(1, n + 1))
    for step in range(1, n + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    # written as shards, one file per rank (torch.distributed.checkpoint), beside the usual meta and tokenizer
    path = load_checkpoint(run_dir("killed")).path
    assert not (path / "model.safetensors").exists() and len(list((path / "shards").glob("*.distcp"))) == 2
    # saved by 2 ranks, loaded by one: the same weights, and the same logits as the straight run's
    one, other = load_checkpoint(run_dir("killed")).model, load_checkpoint(run_dir("straight")).model
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(one(idx), other(idx), atol=1e-5, rtol=0)
    # exported as the ordinary one-file checkpoint: the same model
    from adamba.cli import main
    assert main(["export", "unsharded", "killed", "--tag", "one-file"]) == 0
    exported = load_checkpoint(run_dir("one-file"))
    assert (exported.path / "model.safetensors").exists() and exported.step == n
    with torch.no_grad():
        assert torch.equal(exported.model(idx), one(idx))
    # and it resumes in one process without --fsdp: the optimizer states, resharded, load into the plain model
    train(tiny_config(), tiny_train_config(corpus_dir, run_name="killed", **{**common, "num_iterations": n + 1}),
          resume=True, progress=False)
    assert sorted(losses("killed")) == list(range(1, n + 2))


@pytest.mark.slow  # three processes on two cores (make test-slow)
def test_an_fsdp_checkpoint_of_two_ranks_resumes_on_three(corpus_dir):
    """torch.distributed.checkpoint reshards the weights and optimizer states for a larger world: a run saved by 2
    ranks continues under FSDP on 3 (the same global batch: 2 ranks x 3 micro-steps = 3 ranks x 2), its loss
    continuing that of the run that stayed on 2 ranks (not exactly: the ranks take other rows of the batch)."""
    common = dict(num_iterations=4, save_every=2, device_batch_size=2, total_batch_size=2 * 32 * 6, muon="polar")
    flags = [*train_flags(corpus_dir, "two", **common), "--fsdp", "true", "--muon", "polar"]
    done = subprocess.run(torchrun("train", *flags), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    flags = [*train_flags(corpus_dir, "grown", **{**common, "num_iterations": 2}), "--fsdp", "true", "--muon", "polar"]
    done = subprocess.run(torchrun("train", *flags), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    three = [arg.replace("--nproc_per_node=2", "--nproc_per_node=3") for arg in torchrun("train", "--resume", *[
        *train_flags(corpus_dir, "grown", **common), "--fsdp", "true", "--muon", "polar"])]
    done = subprocess.run(three, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 rank(s) x 2 micro-steps" in done.stdout and "resuming grown from" in done.stdout
    a, b = losses("two"), losses("grown")
    assert sorted(b) == [1, 2, 3, 4] and b[1] == a[1] and b[2] == a[2]
    for step in (3, 4):  # the resumed optimizer states are the saved ones: the loss goes on as on two ranks
        assert b[step] == pytest.approx(a[step], abs=0.05), step
    assert len(list((load_checkpoint(run_dir("grown")).path / "shards").glob("*.distcp"))) == 3


def test_fsdp_needs_torchrun(corpus_dir, capsys):
    from adamba.cli import main

    assert main(["train", *train_flags(corpus_dir, "x"), "--fsdp", "true"]) == 2
    assert "fsdp: shards over the ranks of torchrun" in capsys.readouterr().err


def fine_tune_under_fsdp_and_ddp(what: str, base: str, keys) -> list[dict]:
    """tests/under_torchrun.py's `what` (sft, rl) from `base`, as runs {what}-fsdp and {what}-ddp: each metric of
    `keys` at every step it was logged the same in both (to 1e-5); the FSDP run's records."""
    records = {}
    for fsdp in ("1", "0"):
        run = f"{what}-{'fsdp' if fsdp == '1' else 'ddp'}"
        done = subprocess.run(under_torchrun(what, run, base, fsdp), env=env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        records[fsdp] = [json.loads(line) for line in (run_dir(run) / "metrics.jsonl").read_text().splitlines()]
    for key in keys:
        a, b = ({r["step"]: r[key] for r in records[fsdp] if key in r} for fsdp in ("1", "0"))
        assert a and sorted(a) == sorted(b), key
        for step in a:
            assert a[step] == pytest.approx(b[step], abs=1e-5), (key, step)
    return records["1"]


def test_sft_under_fsdp_equals_it_under_ddp_chat_evaluation_included(corpus_dir):
    """Fine-tuning a sharded model: the same losses, validation losses, chat-evaluation scores (each rank decoding
    its stripe of the items with its inference copy) and weights as under DDP."""
    train(tiny_config(block_pattern="TM"), tiny_train_config(corpus_dir, run_name="base", num_iterations=2),
          progress=False)
    records = fine_tune_under_fsdp_and_ddp("sft", "base", ("loss", "val_loss", "chat/even"))
    scores = [r["chat/even"] for r in records if "chat/even" in r]
    assert len(scores) == 3 and any(0 < score < 1 for score in scores)  # at steps 0, 2, 4; the texts vary
    assert (load_checkpoint(run_dir("sft-fsdp")).path / "shards").is_dir()
    sharded, replicated = load_checkpoint(run_dir("sft-fsdp")).model, load_checkpoint(run_dir("sft-ddp")).model
    for (name, p), q in zip(sharded.named_parameters(), replicated.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=name)


def test_samples_during_fsdp_training_equal_one_process_decoding_the_checkpoint(corpus_dir):
    """Every rank decodes alongside (a sharded forward is a collective); rank 0 prints what one process decodes."""
    from adamba.infer.engine import Engine
    from adamba.infer.sampling import SamplingParams
    from adamba.train.trainer import SAMPLE_PROMPTS

    run = subprocess.run(torchrun("train", *train_flags(corpus_dir, "y", num_iterations=2, device_batch_size=2,
                                                        total_batch_size=4 * 32), "--block-pattern", "TM",
                                  "--fsdp", "true", "--sample-every", "2"),
                         env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = [line.split("sample: ", 1)[1] for line in (run.stdout + run.stderr).splitlines() if "sample: " in line]
    assert len(printed) == 2 * len(SAMPLE_PROMPTS)  # at steps 0 and 2, by rank 0 only
    ckpt = load_checkpoint(run_dir("y"))
    engine = Engine(ckpt.model, ckpt.tokenizer)
    for prompt, line in zip(SAMPLE_PROMPTS, printed[-len(SAMPLE_PROMPTS):], strict=True):
        assert line == f"{prompt!r} -> {engine.complete(prompt, 32, SamplingParams(temperature=0.0))!r}"



@pytest.mark.parametrize("pattern", ["T", "TM", "TM2"])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(pattern):
    from adamba.model.compute import Compute
    from adamba.train.fsdp import checkpoint_blocks

    def grads_and_saved(checkpointed: bool, compute=None):
        torch.manual_seed(0)
        model = AdambaLM(tiny_config(block_pattern=pattern, n_layer=4 if pattern == "TM2" else 2,
                                     mamba2_headdim=16)).double()
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "dt_proj.bias", "dt_bias", "mixer.D")):
                torch.nn.init.normal_(p, std=0.2)
        if checkpointed:
            checkpoint_blocks(model)
        idx = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
        saved, weights = [], {id(p) for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = model(idx[:, :-1], idx[:, 1:], compute=compute)
        kept = sum(t.numel() for t in saved if id(t) not in weights)  # activations, not the weights themselves
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, kept

    for compute in (None, Compute(16)):  # full width, and a Matryoshka slice
        loss, grads, kept = grads_and_saved(False, compute)
        loss_c, grads_c, kept_c = grads_and_saved(True, compute)
        assert torch.equal(loss, loss_c)
        for name, g in grads.items():
            if g is None:
                assert grads_c[name] is None, name
            else:
                torch.testing.assert_close(grads_c[name], g, atol=1e-12, rtol=1e-12, msg=name)
        # the blocks' insides are not kept for the backward; the head's logits still are, which dominate a narrow
        # slice of this tiny model (measured: 0.20-0.32 of the activations kept at full width, 0.20-0.73 at 16)
        assert kept_c < (0.6 if compute is None else 0.9) * kept


@pytest.mark.slow  # two torchrun jobs (make test-slow); the default suite keeps new-dims, SFT and RL under FSDP
def test_matryoshka_training_under_fsdp_equals_it_under_ddp(corpus_dir):
    """Each rank samples the same widths under FSDP as under DDP, so the two runs must agree: the sharded model's
    Matryoshka slices (weights sliced inside the gathered units) train exactly as the replicated one's."""
    common = dict(num_iterations=2, device_batch_size=2, total_batch_size=4 * 32)
    flags = ["--block-pattern", "TM", "--matryoshka", "true", "--matryoshka-per-layer", "true"]
    for run, extra in (("m-fsdp", ["--fsdp", "true"]), ("m-ddp", [])):
        done = subprocess.run(torchrun("train", *train_flags(corpus_dir, run, **common), *flags, *extra), env=env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    for step in (1, 2):
        assert losses("m-fsdp")[step] == pytest.approx(losses("m-ddp")[step], abs=1e-5)
    sharded, replicated = load_checkpoint(run_dir("m-fsdp")).model, load_checkpoint(run_dir("m-ddp")).model
    for (name, p), q in zip(sharded.named_parameters(), replicated.parameters(), strict=True):
        muon_param = name.startswith("blocks.") and p.ndim == 2
        torch.testing.assert_close(p, q, atol=1e-4 if muon_param else 2e-5, rtol=0, msg=name)


@pytest.mark.slow  # two torchrun jobs (make test-slow); the default suite keeps new-dims, SFT and RL under FSDP
def test_the_mamba_only_growth_stage_under_fsdp_equals_it_under_ddp(corpus_dir, tokenizer):
    """Freezing everything but the inserted Mamba blocks: FSDP units hold frozen and trained parameters together."""
    from test_surgery import _grown_checkpoint

    _, grown = _grown_checkpoint("add-mamba", tiny_config(vocab_size=tokenizer.vocab_size), tokenizer)
    common = dict(num_iterations=2, device_batch_size=2, total_batch_size=4 * 32)
    for run, extra in (("s-fsdp", ["--fsdp", "true"]), ("s-ddp", [])):
        done = subprocess.run(torchrun("train", *train_flags(corpus_dir, run, **common), "--init-from", "grown",
                                       "--stage", "mamba-only", *extra), env=env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    sharded, replicated = load_checkpoint(run_dir("s-fsdp")).model, load_checkpoint(run_dir("s-ddp")).model
    trained = 0
    for (name, p), q, before in zip(sharded.named_parameters(), replicated.parameters(), grown.parameters(),
                                    strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=name)
        if name.startswith(("blocks.1.", "blocks.3.")):  # the inserted Mamba blocks
            trained += not torch.equal(p, before)
        else:
            assert torch.equal(p, before), name  # frozen: bitwise as grown
    assert trained > 0


def test_the_new_dims_growth_stage_under_fsdp_equals_it_under_ddp(corpus_dir, tokenizer):
    """After widen, only the new dimensions train: each rank masks its own shard of every parameter (the masks
    sharded as the parameters are), and the old entries stay bitwise what they were, as under DDP."""
    from test_surgery import _grown_checkpoint

    from adamba.surgery.widen import old_entry_masks

    before, grown = _grown_checkpoint("widen", tiny_config(vocab_size=tokenizer.vocab_size, block_pattern="TM"),
                                      tokenizer)
    common = dict(num_iterations=2, device_batch_size=2, total_batch_size=4 * 32)
    for run, extra in (("w-fsdp", ["--fsdp", "true"]), ("w-ddp", [])):
        done = subprocess.run(torchrun("train", *train_flags(corpus_dir, run, **common), "--init-from", "grown",
                                       "--stage", "new-dims", "--grad-clip", "0.5", "--weight-decay", "0.1", *extra),
                              env=env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    sharded, replicated = load_checkpoint(run_dir("w-fsdp")).model, load_checkpoint(run_dir("w-ddp")).model
    masks = old_entry_masks(before.config, grown)
    moved = 0.0
    for (name, p), q, start in zip(sharded.named_parameters(), replicated.parameters(), grown.parameters(),
                                   strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=name)
        assert torch.equal(p[masks[name]], start[masks[name]]), name  # the old model, bitwise
        moved = max(moved, (p - start).abs().max().item())
    assert moved > 1e-3  # the new entries trained
