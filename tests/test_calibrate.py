"""Learn-then-Test calibration (eval/calibrate.py), its checkpoint sidecar, and the adaptive CLI commands."""

import json
import re

import numpy as np
import pytest
import torch

from adamba.checkpoint import CheckpointError, load_checkpoint, run_dir
from adamba.cli import main
from adamba.eval.calibrate import Run, calibrate, learn_then_test, measure, sweep
from adamba.model.calibration_file import CALIBRATION
from adamba.model.compute import Compute
from adamba.model.exits import Adaptive
from tests.test_cli import TINY
from tests.test_exits import random_model


def test_fixed_sequence_testing_stops_at_the_first_failure():
    n, delta, eps = 10_000, 0.01, 0.1
    # risk grows down the (descending) grid; the third count is too high, the fifth low again: never reached
    counts = np.array([0, 40, 120, 90, 10])
    assert learn_then_test(counts, n, delta, eps) == 1
    assert learn_then_test(np.array([150, 0]), n, delta, eps) is None


def test_learn_then_test_controls_the_risk_on_simulated_data():
    # thresholds whose true disagreement rates grow down the grid; calibrate on n Bernoulli draws per threshold,
    # many times: the chosen threshold's true risk exceeds delta at most epsilon of the time (up to sampling slack)
    rng = np.random.default_rng(0)
    true_risk = np.array([0.0, 0.002, 0.005, 0.008, 0.0095, 0.0105, 0.013, 0.02, 0.05])
    n, delta, eps, trials = 4000, 0.01, 0.1, 400
    failures = 0
    for _ in range(trials):
        u = rng.random(n)
        counts = (u[None, :] < true_risk[:, None]).sum(1)  # nested: one uniform per token, as exits nest
        g = learn_then_test(counts, n, delta, eps)
        failures += g is not None and true_risk[g] > delta
    assert failures / trials <= eps + 0.03


@torch.no_grad()
def test_sweep_counts_what_the_adaptive_forward_does():
    model = random_model(torch.float64)
    batches = [(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))) for _ in range(2)]
    result = sweep(model, batches, thresholds=(0.99, 0.6))
    for g, t in enumerate((0.99, 0.6)):
        disagree = flops = exited = 0
        for x, _ in batches:
            out = model(x, compute=Compute(adaptive=Adaptive(threshold=t)), outputs=True)
            logits, record = out.logits, out.exits
            disagree += int((logits.argmax(-1) != model(x).argmax(-1)).sum())
            flops += float(record.token_flops(model.config, 16).sum())
            exited += int((record.exit_layer < 4).sum())
        rows = result.rows()
        assert rows["disagree"][g] == disagree and rows["exit_rate"][g] == exited / 64
        assert rows["flops"][g] == pytest.approx(flops / 64)
    # a run with a fixed FLOP count, scored from position 4 on
    fixed = measure(model, batches, [Run("k=2", lambda x: {"exit_layers": torch.full(x.shape, 2)}, flops=123.0)],
                    start=4)
    assert fixed.rows()["tokens"] == 4 * 12 and fixed.rows()["flops"][0] == pytest.approx(123.0)
    assert fixed.exit_hist[0].tolist() == [0, 0, 48, 0, 0]
    with pytest.raises(ValueError, match="^delta"):
        calibrate(result, 1.5, 0.1)


def test_calibrate_eval_adaptive_and_sample_from_the_command_line(corpus_dir, tmp_path, capsys):
    adaptive = ["--n-layer", "3", "--block-pattern", "TMT", "--min-exit-layer", "1", "--predictor-layers", "1",
                "--exit-loss-weight", "1", "--gate-loss-weight", "1", "--predictor-weight", "1",
                "--predictor-context", "8", "--matryoshka", "true"]
    args = [a for a in TINY if a not in ("--n-layer", "2")]
    assert main(["train", "--run-name", "ad", "--data", str(corpus_dir), "--num-iterations", "8", *args,
                 *adaptive]) == 0
    capsys.readouterr()
    # delta 0.5: loose enough that a barely trained model gets a certified threshold
    assert main(["calibrate", "ad", "--delta", "0.5", "--tokens", "512", "--batch-size", "2", "--device",
                 "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"exit threshold [\d.]+ \(Learn-then-Test, delta=0.5", out), out
    assert re.search(r"exit rate [\d.]+%", out) and re.search(r"FLOPs saved [\d.]+%", out)
    ckpt = load_checkpoint(run_dir("ad"))
    saved = json.loads((ckpt.path / CALIBRATION).read_text())
    assert ckpt.model.adaptive_heads.thresholds == dict.fromkeys((1, 2), saved["threshold"])
    assert Adaptive().exit_thresholds(ckpt.model) == dict.fromkeys((1, 2), saved["threshold"])

    assert main(["eval", "adaptive", "ad", "--tokens", "512", "--batch-size", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for curve in ("| exit |", "| depth |", "| width |", "| predictor |", "| exit | calibrated"):
        assert curve in out
    report = run_dir("ad").parent.parent / "reports" / "ad"
    assert (report / "adaptive.md").exists() and (report / "adaptive.png").stat().st_size > 0

    for spec in ("calibrated", "seeds", "predictor", "0.9"):
        assert main(["sample", "ad", "--prompt", "The", "--max-tokens", "4", "--temperature", "0", "--device",
                     "cpu", "--adaptive", spec]) == 0
    assert main(["sample", "ad", "--adaptive", "sometimes", "--device", "cpu"]) == 2
    assert "--adaptive: 'sometimes'" in capsys.readouterr().err

    # the sidecar is bound to the weights and checksummed
    saved["risk"] = -1.0  # edited after saving
    (ckpt.path / CALIBRATION).write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="do not match their checksum"):
        load_checkpoint(ckpt.path)
    saved = {k: v for k, v in saved.items() if k != "sha256"} | {"weights_sha256": "0" * 64}
    from adamba.model.calibration_file import _payload_sha256

    (ckpt.path / CALIBRATION).write_text(json.dumps(saved | {"sha256": _payload_sha256(saved)}))
    with pytest.raises(CheckpointError, match="calibrated for other weights"):
        load_checkpoint(ckpt.path)
