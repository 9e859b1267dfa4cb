import re
from pathlib import Path

import pytest

from adamba.checkpoint import run_dir
from adamba.cli import main

# | mode | widths | FLOPs | of full | bpb (low-high) | difference from full width |
MODE_ROW = (r"\| ([\w =]+) \| ([\d ]+(?: full)?) \| ([\d.e+]+) \| ([\d.]+)% \| ([\d.]+) \(([\d.]+)-([\d.]+)\) \| "
            r"([^|]+) \|")
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
    bpb, low, high = map(float, re.search(r"val bpb ([\d.]+) \(([\d.]+)-([\d.]+)\)",
                                          capsys.readouterr().out).groups())
    assert 0.5 < bpb < 10 and low < bpb < high

    assert main(["modes", "cli", "--tokens", "256", "--device", "cpu", "--batch-size", "2"]) == 0
    rows = {m[0]: m[1:] for m in re.findall(MODE_ROW, capsys.readouterr().out)}
    # at n_embd 64 Ghost and Whisper both run width 16: one computation, one row with both names
    assert set(rows) == {"ghost = whisper", "normal", "think"}
    assert rows["think"][0] == "64 64" and rows["think"][2] == "100.0" and rows["ghost = whisper"][0] == "16 16"
    assert float(rows["ghost = whisper"][1]) < float(rows["normal"][1]) < float(rows["think"][1])
    assert rows["think"][3:6] == (f"{bpb:.4f}", f"{low:.4f}", f"{high:.4f}")  # full width is `eval bpb`'s number
    assert rows["think"][6] == "(control)" and re.fullmatch(r"[+-][\d.]+ \([+-][\d.]+ to [+-][\d.]+\)",
                                                             rows["normal"][6])
    assert main(["sample", "cli", "--prompt", "The", "--max-tokens", "5", "--mode", "ghost", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["eval", "elastic", "cli", "--tokens", "256", "--device", "cpu", "--batch-size", "2"]) == 0
    report = Path(re.search(r"report: (\S+)", capsys.readouterr().out).group(1))
    assert report.exists() and (report.parent / "elastic.png").stat().st_size > 1000
    assert "| think | 64 64 |" in report.read_text() and "| ghost = whisper | 16 16 |" in report.read_text()
    assert main(["sample", "cli", "--mode", "fast", "--device", "cpu"]) == 2
    assert "unknown compute mode 'fast'" in capsys.readouterr().err
    compiled = ["sample", "cli", "--prompt", "The", "--max-tokens", "4", "--mode", "ghost", "--compile",
                "--device", "cpu"]
    assert main(compiled) == 0 and capsys.readouterr().out.startswith("The")
    assert main([*compiled, "--adaptive", "seeds"]) == 2
    assert "adaptive: a compiled engine (compile=True) decodes at fixed widths" in capsys.readouterr().err
    greedy = ["sample", "cli", "--prompt", "The king", "--max-tokens", "20", "--temperature", "0", "--device", "cpu"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main([*greedy, "--speculative", "exit:1", "--draft-tokens", "3"]) == 0
    spoken = capsys.readouterr()
    assert spoken.out == plain
    assert re.search(r"\[speculative exit:1, k=3: \d+ of \d+ drafted tokens accepted", spoken.err)
    assert main([*greedy, "--speculative", "exit:7"]) == 2
    assert "--speculative: depth: 7 is not a number of blocks from 1 to n_layer=2" in capsys.readouterr().err


def test_bad_input_gives_clear_errors(corpus_dir, capsys):
    assert main(["train", "--data", str(corpus_dir), *TINY, "--n-head", "5"]) == 2
    assert "n_head: 5 does not divide n_embd=64" in capsys.readouterr().err
    assert main(["sample", "no-such-run", "--device", "cpu"]) == 2
    assert "no-such-run: no checkpoint found" in capsys.readouterr().err
    assert main(["train", "--config", "missing.toml"]) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err


def test_demo_runs_the_pipeline_and_shows_every_mode(corpus_dir, monkeypatch, capsys):
    """pretrain -> compute modes -> base chat eval -> SFT -> chat eval per mode and without tools -> report, on the
    demo's own configs shrunk to seconds; the command it prints to talk to the result works."""
    import dataclasses

    from adamba import demo

    real, real_sft = demo.demo_configs, demo.sft_configs

    def tiny(run, minutes):
        model, config = real(run, minutes)
        model = dataclasses.replace(model, depth=None, n_layer=2, block_pattern="TM", n_embd=64, n_head=4,
                                    sequence_len=64, matryoshka_levels=None, compute_modes=None)
        config = dataclasses.replace(config, data=str(corpus_dir), tokenizer_vocab_size=512, device_batch_size=4,
                                     total_batch_size=256, num_iterations=6, eval_every=3, eval_tokens=256,
                                     time_budget_s=0, val_fraction=0.3)
        return model, config

    def tiny_sft(run, base, minutes):
        sft_config, config = real_sft(run, base, minutes)
        assert not config.matryoshka and config.time_budget_s == minutes * 60  # full-width SFT (demo.py says why)
        config = dataclasses.replace(config, device_batch_size=4, total_batch_size=256, eval_every=1, eval_tokens=256,
                                     time_budget_s=0)
        return dataclasses.replace(sft_config, num_iterations=2), config

    monkeypatch.setattr(demo, "demo_configs", tiny)
    monkeypatch.setattr(demo, "sft_configs", tiny_sft)
    monkeypatch.setattr(demo, "MODE_EVAL_TOKENS", 1024)
    assert main(["demo", "--run", "tinydemo", "--items", "3"]) == 0
    out = capsys.readouterr().out
    assert "energy penalty: widths are sampled by the sandwich rule" in out
    assert [m for m in ("ghost = whisper", "normal", "think") if f"[{m} (" in out] == ["ghost = whisper", "normal",
                                                                                      "think"]
    table = re.findall(MODE_ROW, out)
    assert [(mode, widths) for mode, widths, *_ in table] == [("ghost = whisper", "16 full"), ("normal", "32 full"),
                                                             ("think", "64 full")]
    assert all(float(low) < float(bpb) < float(high) for *_, bpb, low, high, _ in table), table
    assert "| task | ghost | normal | full | no tools |" in out
    assert re.search(r"\| arithmetic \| [\d.]+% \(\d/3\)", out)
    report = Path(re.search(r"report: (\S+)", out).group(1)).read_text()
    assert "## Compute modes" in report and "Matryoshka, sandwich rule" in report and "think (64 wide):" in report
    assert "## Chat" in report and "Base model (before SFT), full width" in report and "SFT | 2 steps" in report
    command = re.search(r"talk to it:  adamba (chat \S+)", out).group(1).split()
    assert command == ["chat", "tinydemo-sft"]
    assert main([*command, "-p", "What is 2 + 3?", "--max-tokens", "4", "--seed", "0"]) == 0


def test_one_plain_text_file_is_a_corpus(tmp_path, capsys):
    """nanoGPT-style: one ~1 MB input.txt trains and has held-out data (its pieces, corpus.text_pieces)."""
    from tests.test_data import prose

    text_file = tmp_path / "input.txt"
    text_file.write_text(prose(1_000_000))
    assert 0.9e6 < text_file.stat().st_size < 1.1e6
    args = [a for a in TINY if a != "--val-fraction" and a != "0.1"]
    assert main(["train", "--data", str(text_file), "--run-name", "txt", "--num-iterations", "2", *args]) == 0
    assert "finished at step 2" in capsys.readouterr().out
    assert main(["eval", "bpb", "txt", "--tokens", "1024", "--device", "cpu", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert 0.5 < float(re.search(r"val bpb ([\d.]+)", out).group(1)) < 10 and "over 8 batches" in out


def _help_defaults(argv: list[str], monkeypatch, capsys) -> dict[str, str]:
    """Each config flag of `adamba train ... --help` -> its help text (one line: the terminal is wide)."""
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(argv)
    return dict(re.findall(r"^  --([\w-]+) [A-Z]+\s+(.*)$", capsys.readouterr().out, flags=re.MULTILINE))


def test_train_help_shows_each_default_once_from_the_dataclass_or_the_config(tmp_path, monkeypatch, capsys):
    import dataclasses

    from adamba.config import ModelConfig, TrainConfig

    shown = _help_defaults(["train", "--help"], monkeypatch, capsys)
    fields = {f.name.replace("_", "-"): f for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}
    assert shown.pop("config").startswith("TOML file") and set(shown) == set(fields)
    for flag, text in shown.items():
        assert text.count("(default:") == 1, f"--{flag}: {text}"
        assert text.endswith(f"(default: {fields[flag].default!r})"), f"--{flag}: {text}"
    assert shown["run-name"] == "checkpoints go to $ADAMBA_HOME/checkpoints/<run>/ (default: 'default')"

    config = tmp_path / "run.toml"
    config.write_text('[model]\ndepth = 6\n[train]\nrun_name = "mine"\nmatryoshka = true\n')
    shown = _help_defaults(["train", "--config", str(config), "--help"], monkeypatch, capsys)
    assert all(text.count("(default:") == 1 for text in shown.values() if not text.startswith("TOML"))
    assert shown["depth"] == f"(default: 6, from {config})"
    assert shown["matryoshka"] == f"(default: True, from {config})"
    assert shown["run-name"].endswith(f"(default: 'mine', from {config})")
    assert shown["n-embd"] == "(default: None)" and shown["seed"] == "(default: 42)"
