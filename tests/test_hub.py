"""Hugging Face format (adamba/hub.py, model/pretrained.py): export then from_pretrained gives the same logits; the
model card states only measured or counted numbers; the hub calls are wired (huggingface_hub mocked: no network)."""

import json

import pytest
import safetensors.torch
import torch
import yaml
from conftest import tiny_config, tiny_train_config

from adamba import AdambaLM
from adamba.checkpoint import load_checkpoint, run_dir, save_checkpoint
from adamba.cli import main
from adamba.hub import export_hf, model_card, push_to_hub
from adamba.model.compute import Compute


@pytest.fixture
def trained(corpus_dir):
    """A tiny recipe hybrid trained 4 steps (val bpb measured at steps 0 and 4)."""
    from adamba.train.trainer import train

    config = tiny_config(block_pattern="TM", n_kv_head=2, value_embeds="alternating", smear=True)
    train(config, tiny_train_config(corpus_dir, run_name="hubrun", eval_every=4), progress=False)
    return load_checkpoint(run_dir("hubrun"))


def card_header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_export_then_from_pretrained_gives_identical_logits(trained, tmp_path):
    out = export_hf("hubrun", tmp_path / "hf" / "tiny-adamba")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.pkl"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "adamba" and config["architectures"] == ["AdambaLM"] and config["smear"] is True
    model = AdambaLM.from_pretrained(out)
    assert not model.training and model.config == trained.model.config
    idx = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in (None, "ghost"):
            compute = Compute(mode) if mode else None
            assert torch.equal(model(idx, compute=compute), trained.model(idx, compute=compute))


def test_the_card_lists_only_measured_numbers(trained, tmp_path):
    records = [json.loads(line) for line in (run_dir("hubrun") / "metrics.jsonl").read_text().splitlines()]
    bpbs = [r for r in records if "val_bpb" in r]
    card = model_card(trained, "tiny-adamba", license="mit")
    header = card_header(card)
    assert header["library_name"] == "adamba" and header["license"] == "mit"
    assert set(header["tags"]) == {"adamba", "mamba", "transformer"}
    assert f"Held-out val bpb at step 4: {bpbs[-1]['val_bpb']:.4f} (at step 0: {bpbs[0]['val_bpb']:.4f})" in card
    assert f"4 steps, {4 * 4 * 32:,} tokens" in card
    for mode, width in trained.model.config.compute_modes.items():  # the FLOP counter's counts, per mode
        flops = trained.model.count_flops(compute=Compute(mode)).forward
        assert f"| {mode} | {width} | {flops:.4g} |" in card
    assert "No evaluation was recorded" in card  # no report was written for this run
    assert "license" not in card_header(model_card(trained, "x"))  # no licence claimed unless given

    # a report written for the run is copied verbatim; nothing else appears
    from adamba.eval.report_files import report_dir
    report = "# Chat evaluation: hubrun\n\n| task | full |\n|---|---:|\n| x | 12.5% |\n"
    (report_dir("hubrun") / "chat.md").write_text(report)
    card = model_card(trained, "tiny-adamba")
    assert "### chat.md" in card and "| x | 12.5% |" in card and "No evaluation was recorded" not in card


def test_a_checkpoint_without_a_training_log_gets_no_training_numbers(tmp_path):
    model = AdambaLM(tiny_config())
    save_checkpoint(tmp_path / "bare", model, step=3)
    card = model_card(load_checkpoint(tmp_path / "bare"), "bare")
    assert "No training log was found" in card and "val bpb" not in card


def test_a_calibrated_checkpoint_ships_its_thresholds_bound_to_the_exported_weights(tmp_path):
    """calibration.json goes with the export, re-bound to model.safetensors: from_pretrained exits where the
    checkpoint does, the card gives the calibration's own numbers, and thresholds for other weights are refused."""
    from adamba.checkpoint import save_calibration
    from adamba.model.calibration_file import CALIBRATION
    from adamba.model.exits import Adaptive

    torch.manual_seed(0)
    model = AdambaLM(tiny_config(block_pattern="TMT", n_layer=3, min_exit_layer=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    saved = save_checkpoint(tmp_path / "ckpt", model, step=5)
    measured = {"delta": 0.1, "epsilon": 0.05, "width": None, "threshold": 0.55, "thresholds": {"1": 0.55, "2": 0.55},
                "tokens": 4096, "risk": 0.0731, "exit_rate": 0.42, "flops_saved": 0.187, "mean_exit": 2.31}
    save_calibration(saved, load_checkpoint(saved).meta, measured)
    ckpt = load_checkpoint(saved)
    out = export_hf(saved, tmp_path / "hf")
    assert (out / CALIBRATION).is_file()
    loaded = AdambaLM.from_pretrained(out)
    assert loaded.adaptive_heads.thresholds == ckpt.model.adaptive_heads.thresholds == {1: 0.55, 2: 0.55}
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = loaded(idx, compute=Compute(adaptive=Adaptive()), outputs=True)
        theirs = ckpt.model.eval()(idx, compute=Compute(adaptive=Adaptive()), outputs=True)
    assert torch.equal(mine.exits.exit_layer, theirs.exits.exit_layer) and torch.equal(mine.logits, theirs.logits)
    card = (out / "README.md").read_text()
    assert "on 4,096 held-out tokens" in card and "| 0.55 | 0.0731 | 42.0% | 18.7% | 2.31 |" in card
    # other weights under the same calibration: refused, naming the file
    state = {k: v.clone() for k, v in loaded.state_dict().items()}
    state["lm_head.weight"] += 1
    safetensors.torch.save_file(state, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"calibration\.json: calibrated for other weights than .*model\.safetensors"):
        AdambaLM.from_pretrained(out)


def test_from_pretrained_errors_name_the_file_and_the_fix(trained, tmp_path):
    out = export_hf("hubrun", tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_experts": 8}))
    with pytest.raises(ValueError, match=r"config\.json: .*n_experts"):
        AdambaLM.from_pretrained(out)
    (out / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama', not 'adamba'"):
        AdambaLM.from_pretrained(out)
    (out / "config.json").write_text(json.dumps({**config, "n_layer": 4, "block_pattern": ["T", "M"] * 2}))
    with pytest.raises(ValueError, match=r"model\.safetensors: weights do not match config\.json: missing keys"):
        AdambaLM.from_pretrained(out)
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        AdambaLM.from_pretrained(out)
    with pytest.raises(FileNotFoundError, match="not a folder .* nor a hub repository id"):
        AdambaLM.from_pretrained(tmp_path / "nowhere" / "deeper")


def test_hub_repository_ids_and_push_go_through_huggingface_hub(trained, tmp_path, monkeypatch):
    import huggingface_hub

    out = export_hf("hubrun", tmp_path / "m")
    asked = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = AdambaLM.from_pretrained("someone/tiny-adamba", revision="v1")
    assert asked["repo_id"] == "someone/tiny-adamba" and asked["revision"] == "v1"
    assert "model.safetensors" in asked["patterns"] and "config.json" in asked["patterns"]
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(idx), trained.model(idx))

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()),
                          repo_id))
            return "https://hub.invalid/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(out, "someone/tiny-adamba", private=True, token="t") == "https://hub.invalid/commit/1"
    assert calls == [("token", "t"), ("create", "someone/tiny-adamba", True, True),
                     ("upload", ["README.md", "config.json", "model.safetensors", "tokenizer.pkl"],
                      "someone/tiny-adamba")]
    with pytest.raises(FileNotFoundError, match="not an exported model folder"):
        push_to_hub(tmp_path, "someone/x")


def test_export_command(trained, tmp_path, capsys):
    assert main(["export", "hf", "hubrun", str(tmp_path / "cli-out"), "--name", "tiny"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "cli-out" / "README.md").read_text().splitlines()[6] == "# tiny"
    assert main(["export", "hf", "no-such-run", str(tmp_path / "x")]) == 2
    assert "no-such-run" in capsys.readouterr().err
