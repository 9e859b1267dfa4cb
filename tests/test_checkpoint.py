import json

import pytest
import torch
from conftest import tiny_config

from adamba import AdambaLM
from adamba.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


def trained_model():
    model = AdambaLM(tiny_config())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def test_round_trip_gives_identical_logits(tmp_path, tokenizer):
    model = trained_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 512, (1, 8)), torch.randint(0, 512, (1, 8))).backward()
    opt.step()
    path = save_checkpoint(tmp_path, model, step=7, optimizers=[opt], loader_state={"epoch": 1, "shard": 0,
                           "batch": 3}, tokenizer=tokenizer, train_config={"run": "x"})
    assert path.name == "step_000007" and latest_checkpoint(tmp_path) == path
    ck = load_checkpoint(tmp_path, with_optimizer=True)
    idx = torch.randint(0, 512, (2, 16))
    assert torch.equal(ck.model(idx), model(idx))
    assert ck.step == 7 and ck.meta["loader"]["batch"] == 3 and ck.model.config == model.config
    assert ck.tokenizer.encode("fair king") == tokenizer.encode("fair king")
    opt2 = torch.optim.AdamW(ck.model.parameters())
    opt2.load_state_dict(ck.optimizer_state["optimizers"][0])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_latest_of_several_and_resave(tmp_path):
    model = trained_model()
    for step in (2, 10, 5):
        save_checkpoint(tmp_path, model, step=step)
    assert latest_checkpoint(tmp_path).name == "step_000010"
    save_checkpoint(tmp_path, model, step=10)  # overwriting a step swaps it in atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000005", "step_000010"]


def test_crash_while_saving_leaves_last_good_checkpoint(tmp_path, monkeypatch):
    model = trained_model()
    save_checkpoint(tmp_path, model, step=1)
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, step=2)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]
    load_checkpoint(tmp_path)


def test_corrupt_truncated_and_mismatched_checkpoints_name_the_file(tmp_path):
    model = trained_model()
    path = save_checkpoint(tmp_path, model, step=1)
    weights = path / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: contents do not match the checksum"):
        load_checkpoint(path)

    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]["model.safetensors"]  # without a checksum, the format check still catches it
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable safetensors file"):
        load_checkpoint(path)

    weights.write_bytes(data)
    meta["model_config"].update(n_layer=3, block_pattern="T")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.2.attn.c_k.weight'"):
        load_checkpoint(path)
    meta["model_config"].update(n_layer=2, n_embd=128, block_pattern="T", matryoshka_levels=None, compute_modes=None)
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"shape mismatches"):
        load_checkpoint(path)
    meta["model_config"]["n_head"] = 5
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta.json: invalid model_config: n_head"):
        load_checkpoint(path)

    (path / "meta.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match=r"meta.json: not valid JSON"):
        load_checkpoint(path)
    (path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match=r"not an adamba checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"no checkpoint found"):
        load_checkpoint(tmp_path / "nowhere")
