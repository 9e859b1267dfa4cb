from pathlib import Path

import pytest

from adamba import ModelConfig, TrainConfig
from adamba.config import load_toml, parse_block_pattern


def test_depth_derives_sizes():
    c = ModelConfig(depth=20)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == (20, 1280, 10, 10)
    c = ModelConfig(depth=5, head_dim=64)  # 5*64 = 320 -> rounded up to a multiple of 64
    assert (c.n_embd, c.n_head) == (320, 5)


def test_design_example_fields_and_overrides():
    c = ModelConfig(vocab_size=16, n_layer=2, n_embd=64, n_head=4)
    assert c.block_pattern == ["T", "T"] and c.model_head_dim == 16


@pytest.mark.parametrize("pattern,expected", [
    ("TT", ["T", "T"]),
    ("T*2 T*1", ["T", "T", "T"]),
    (["T", "transformer"], ["T", "T"]),
    ("attention, T", ["T", "T"]),
    ("TM2M", ["T", "M2", "M"]),
    ("TM*2 T", ["T", "M", "T", "M", "T"]),
    ("(TM)*2", ["T", "M", "T", "M"]),
])
def test_parse_block_pattern(pattern, expected):
    assert parse_block_pattern(pattern) == expected


def test_pattern_tiles_and_derives_n_layer():
    assert ModelConfig(n_layer=4, block_pattern="T").block_pattern == ["T"] * 4
    assert ModelConfig(block_pattern="T*6", n_embd=64, n_head=4).n_layer == 6


def test_mamba2_blocks_are_available():
    assert ModelConfig(block_pattern="TM2", n_embd=64, n_head=4).block_pattern == ["T", "M2"]
    assert ModelConfig(block_pattern=["mamba2", "M"], n_embd=64, n_head=4).block_pattern == ["M2", "M"]


@pytest.mark.parametrize("fields,name", [
    (dict(n_embd=64, n_head=5), "n_head"),
    (dict(n_embd=64, n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(n_embd=60, n_head=4), "n_head"),  # odd head size 15
    (dict(vocab_size=0), "vocab_size"),
    (dict(sequence_len=-1), "sequence_len"),
    (dict(block_pattern="TX"), "block_pattern"),
    (dict(block_pattern="T*0"), "block_pattern"),
    (dict(block_pattern=""), "block_pattern"),
    (dict(n_layer=3, block_pattern="TT"), "block_pattern"),
    (dict(window_pattern="SLX"), "window_pattern"),
    (dict(logit_softcap=-1), "logit_softcap"),
    (dict(depth=0), "depth"),
])
def test_invalid_model_config_names_field(fields, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        ModelConfig(**fields)


@pytest.mark.parametrize("fields,name", [
    (dict(device_batch_size=0), "device_batch_size"),
    (dict(val_fraction=1.5), "val_fraction"),
    (dict(warmup_ratio=0.6, warmdown_ratio=0.6), "warmdown_ratio"),
    (dict(dtype="fp8"), "dtype"),
    (dict(run_name="a/b"), "run_name"),
    (dict(matrix_lr=-0.1), "matrix_lr"),
    (dict(eval_every=-1), "eval_every"),
])
def test_invalid_train_config_names_field(fields, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        TrainConfig(**fields)


def test_window_pattern_last_attention_layer_is_full():
    c = ModelConfig(n_layer=4, n_embd=64, n_head=4, window_pattern="S", sequence_len=64, short_window=16)
    assert c.attention_windows() == [16, 16, 16, None]
    c = ModelConfig(n_layer=4, n_embd=64, n_head=4, window_pattern="SL", sequence_len=64)
    assert c.attention_windows() == [32, None, 32, None]


def test_dict_and_toml_round_trip(tmp_path):
    c = ModelConfig(depth=3, window_pattern="SSL")
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"n_layers": 3})
    path = tmp_path / "run.toml"
    path.write_text('[model]\ndepth = 3\n[train]\nnum_iterations = 7\nrun_name = "x"\n')
    cfg = load_toml(path, train_overrides={"num_iterations": 9})
    assert cfg.model.n_layer == 3 and cfg.train.num_iterations == 9 and cfg.train.run_name == "x"
    path.write_text("[modle]\n")
    with pytest.raises(ValueError, match="unknown table"):
        load_toml(path)
    path.write_text("[model\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_toml(path)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")), ids=str)
def test_shipped_configs_are_valid(path):
    from adamba.train.horizon import apply_horizon, plan_horizon
    from adamba.train.trainer import grad_accum_steps

    cfg = load_toml(path)
    train = apply_horizon(cfg.train, plan_horizon(cfg.model, cfg.train))  # an automatic batch, where a file asks
    assert grad_accum_steps(train, cfg.model.sequence_len, world_size=1) >= 1


def test_widths_written_as_text_parse_in_one_place():
    from adamba.config import parse_width

    assert parse_width("Ghost") == "ghost" and parse_width("256") == 256 and parse_width(" ") is None
    assert parse_width("64,64,128") == [64, 64, 128] and parse_width(None) is None and parse_width(32) == 32
    with pytest.raises(ValueError, match="^width: '64,x' is not a comma-separated list of widths"):
        parse_width("64,x")
    assert TrainConfig(width="128").width == 128 and TrainConfig(width="").width is None


def test_full_width_is_none_for_blocks_and_n_embd_as_a_number():
    config = ModelConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=512, sequence_len=32, block_pattern="TM")
    assert config.layer_widths("ghost") == [16, None] and config.width_values("ghost") == [16, 64]
    assert config.width_values() == [64, 64] and config.block_width(64) is None and config.block_width(32) == 32
