"""nanochat's horizon from the depth dial (train/horizon.py) against hand computations of its formulas."""

import json
import math

import pytest
from conftest import tiny_config, tiny_train_config

from adamba import ModelConfig, TrainConfig
from adamba.checkpoint import run_dir
from adamba.train.horizon import apply_horizon, plan_horizon, scaling_params
from adamba.train.trainer import train


def hand_scaling_params(depth: int, vocab: int) -> int:
    """A transformer of width 64 x depth: per layer q, k, v, o (4 d^2) and the MLP (2 x 4 d^2), plus lm_head."""
    d = 64 * depth
    return depth * 12 * d * d + vocab * d


def test_scaling_parameters_are_the_block_matrices_and_the_lm_head():
    for depth in (4, 12, 20):
        assert scaling_params(ModelConfig(depth=depth, vocab_size=32768)) == hand_scaling_params(depth, 32768)
    # value embeddings are embeddings, not scaling parameters (nanochat counts them apart too)
    plain = ModelConfig(depth=4, vocab_size=4096)
    assert scaling_params(ModelConfig(depth=4, vocab_size=4096, value_embeds="alternating")) - scaling_params(plain) \
        == 2 * 12 * 2  # only their gates (12 channels -> 2 K/V heads of 128, on layers 1 and 3) are block matrices


def test_the_reference_depth_gets_the_reference_batch_and_unscaled_rates():
    model = ModelConfig(depth=12, vocab_size=32768, sequence_len=2048)
    config = TrainConfig(target_param_data_ratio=12, total_batch_size=-1, device_batch_size=32, weight_decay=0.28)
    horizon = plan_horizon(model, config, world_size=8)
    n = hand_scaling_params(12, 32768)
    assert (horizon.params, horizon.tokens, horizon.batch) == (n, 12 * n, 2 ** 19)
    assert horizon.lr_scale == 1.0 and horizon.weight_decay == pytest.approx(0.28)
    assert horizon.iterations == 12 * n // 2 ** 19
    planned = apply_horizon(config, horizon)
    assert (planned.total_batch_size, planned.num_iterations, planned.matrix_lr) == (2 ** 19, horizon.iterations,
                                                                                    config.matrix_lr)


def test_deeper_models_get_nanochats_larger_batch_and_scaled_rates():
    model = ModelConfig(depth=24, vocab_size=32768, sequence_len=2048)
    config = TrainConfig(target_param_data_ratio=12, total_batch_size=-1, device_batch_size=16, weight_decay=0.28)
    horizon = plan_horizon(model, config, world_size=8)
    ratio = hand_scaling_params(24, 32768) / hand_scaling_params(12, 32768)  # D / D_ref
    batch = 2 ** round(math.log2(2 ** 19 * ratio ** 0.383))
    assert batch == 2 ** 20 and horizon.batch == batch
    assert horizon.lr_scale == pytest.approx(math.sqrt(2))
    assert horizon.weight_decay == pytest.approx(0.28 * math.sqrt(2) / ratio)
    planned = apply_horizon(config, horizon)
    assert planned.embedding_lr == pytest.approx(config.embedding_lr * math.sqrt(2))
    assert planned.num_iterations == int(12 * hand_scaling_params(24, 32768)) // 2 ** 20


def test_the_automatic_batch_is_a_whole_number_of_micro_steps():
    model = ModelConfig(depth=2, vocab_size=512, sequence_len=96)
    config = TrainConfig(target_param_data_ratio=12, total_batch_size=-1, device_batch_size=5)
    horizon = plan_horizon(model, config, world_size=3)
    assert horizon.batch % (5 * 96 * 3) == 0 and horizon.batch >= 5 * 96 * 3


def test_errors_name_the_field():
    with pytest.raises(ValueError, match=r"total_batch_size: -1 \(the automatic batch\).*target_param_data_ratio"):
        TrainConfig(total_batch_size=-1)
    with pytest.raises(ValueError, match="target_param_data_ratio: must be a non-negative number"):
        TrainConfig(target_param_data_ratio=-1)
    assert plan_horizon(tiny_config(), TrainConfig()) is None  # a fixed num_iterations: nothing planned


def test_training_runs_the_planned_number_of_steps(corpus_dir):
    model = tiny_config()  # 2 layers of width 64: 2 x 12 x 64^2 + 512 x 64 = 131,072 scaling parameters
    config = tiny_train_config(corpus_dir, run_name="horizon", target_param_data_ratio=0.01, total_batch_size=256,
                               num_iterations=1000, eval_every=0)
    result = train(model, config, progress=False)
    assert result.step == 1310 // 256 == 5
    steps = [r["step"] for r in map(json.loads, (run_dir("horizon") / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
