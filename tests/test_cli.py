import re
from pathlib import Path

from adamba.checkpoint import run_dir
from adamba.cli import main

TINY = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--sequence-len", "32", "--device", "cpu",
        "--device-batch-size", "4", "--total-batch-size", "128", "--tokenizer-vocab-size", "512",
        "--val-fraction", "0.1", "--eval-tokens", "256"]


def test_tokenizer_commands(corpus_dir, adamba_home, capsys):
    assert main(["tokenizer", "train", "--data", str(corpus_dir), "--vocab-size", "512", "--name", "t512"]) == 0
    assert (adamba_home / "tokenizers" / "t512" / "tokenizer.pkl").exists()
    assert main(["tokenizer", "eval", "--data", str(corpus_dir), "--tokenizer", "t512"]) == 0
    out = capsys.readouterr().out
    ratios = [float(x) for x in re.findall(r"([\d.]+) bytes/token", out)]
    assert len(ratios) == 2 and all(r > 2 for r in ratios)
    assert main(["tokenizer", "train", "--data", str(corpus_dir), "--vocab-size", "100"]) == 2
    assert "vocab_size: 100 is too small" in capsys.readouterr().err


def test_train_sample_eval_from_the_command_line(corpus_dir, tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(f'[train]\nrun_name = "cli"\ndata = "{corpus_dir}"\nnum_iterations = 50\n')
    assert main(["train", "--config", str(config), "--num-iterations", "6", "--eval-every", "3", *TINY]) == 0
    out = capsys.readouterr().out
    assert "finished at step 6" in out and (run_dir("cli") / "step_000006").exists()

    args = ["sample", "cli", "--prompt", "The king", "--max-tokens", "12", "--seed", "3", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("The king")

    assert main(["eval", "bpb", "cli", "--tokens", "256", "--device", "cpu", "--batch-size", "2"]) == 0
    bpb = float(re.search(r"val bpb ([\d.]+)", capsys.readouterr().out).group(1))
    assert 0.5 < bpb < 10

    assert main(["modes", "cli", "--tokens", "256", "--device", "cpu", "--batch-size", "2"]) == 0
    rows = {m[0]: m[1:] for m in re.findall(r"\| (\w+) \| ([\d ]+) \| ([\d.e+]+) \| ([\d.]+)% \| ([\d.]+) \|",
                                            capsys.readouterr().out)}
    assert set(rows) == {"ghost", "whisper", "normal", "think"}
    assert rows["think"][0] == "64 64" and rows["think"][2] == "100.0" and rows["ghost"][0] == "16 16"
    assert float(rows["ghost"][1]) < float(rows["normal"][1]) < float(rows["think"][1])
    assert float(rows["think"][3]) == round(bpb, 4)  # the full mode is the model eval bpb measured
    assert main(["sample", "cli", "--prompt", "The", "--max-tokens", "5", "--mode", "ghost", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["eval", "elastic", "cli", "--tokens", "256", "--device", "cpu", "--batch-size", "2"]) == 0
    report = Path(re.search(r"report: (\S+)", capsys.readouterr().out).group(1))
    assert report.exists() and (report.parent / "elastic.png").stat().st_size > 1000
    assert "| think | 64 64 |" in report.read_text()
    assert main(["sample", "cli", "--mode", "fast", "--device", "cpu"]) == 2
    assert "unknown compute mode 'fast'" in capsys.readouterr().err
    compiled = ["sample", "cli", "--prompt", "The", "--max-tokens", "4", "--mode", "ghost", "--compile",
                "--device", "cpu"]
    assert main(compiled) == 0 and capsys.readouterr().out.startswith("The")
    assert main([*compiled, "--adaptive", "seeds"]) == 2
    assert "adaptive: a compiled engine (compile=True) decodes at fixed widths" in capsys.readouterr().err


def test_bad_input_gives_clear_errors(corpus_dir, capsys):
    assert main(["train", "--data", str(corpus_dir), *TINY, "--n-head", "5"]) == 2
    assert "n_head: 5 does not divide n_embd=64" in capsys.readouterr().err
    assert main(["sample", "no-such-run", "--device", "cpu"]) == 2
    assert "no-such-run: no checkpoint found" in capsys.readouterr().err
    assert main(["train", "--config", "missing.toml"]) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err


def test_demo_trains_a_matryoshka_hybrid_and_shows_every_mode(corpus_dir, monkeypatch, capsys):
    import dataclasses

    from adamba import demo

    real = demo.demo_configs

    def tiny(run, minutes):  # the demo's own configs, shrunk to seconds on a small local corpus
        model, config = real(run, minutes)
        model = dataclasses.replace(model, depth=None, n_layer=2, block_pattern="TM", n_embd=64, n_head=4,
                                    sequence_len=32,
                                    matryoshka_levels=None, compute_modes=None)
        config = dataclasses.replace(config, data=str(corpus_dir), tokenizer_vocab_size=512, device_batch_size=4,
                                     total_batch_size=128, num_iterations=6, eval_every=3, eval_tokens=256,
                                     time_budget_s=0, val_fraction=0.1)
        return model, config

    monkeypatch.setattr(demo, "demo_configs", tiny)
    monkeypatch.setattr(demo, "MODE_EVAL_TOKENS", 256)
    assert main(["demo", "--run", "tinydemo"]) == 0
    out = capsys.readouterr().out
    assert "energy penalty: widths are sampled by the sandwich rule" in out
    assert [m for m in ("ghost", "whisper", "normal", "think") if f"[{m} (" in out] == ["ghost", "whisper", "normal",
                                                                                        "think"]
    table = re.findall(r"\| (\w+) \| 16 full \| [\d.e+]+ \| [\d.]+% \| ([\d.]+) \|", out)
    assert [mode for mode, _ in table] == ["ghost", "whisper"] and "| think | 64 full |" in out
    report = Path(re.search(r"report: (\S+)", out).group(1)).read_text()
    assert "## Compute modes" in report and "Matryoshka, sandwich rule" in report and "think (64 wide):" in report
