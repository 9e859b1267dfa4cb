"""The main job (`make demo`): on the embedded corpus, train the tokenizer (cached), pretrain a tiny Matryoshka
hybrid (attention + Mamba, every width trained) for a few minutes, report val bpb before and after, then show
the compute modes the one set of weights offers: width per layer, FLOPs/token, val bpb, and a sample each."""

from __future__ import annotations

import time

from .checkpoint import load_checkpoint
from .common import print0
from .config import ModelConfig, TrainConfig
from .data.corpus import open_corpus
from .data.dataset import TokenizedCorpus
from .eval.elastic_report import INTERVAL_NOTE, markdown_table, mode_rows
from .infer.engine import Engine
from .infer.sampling import SamplingParams
from .model.compute import Compute
from .train.report import write_report
from .train.trainer import train

DEMO_PROMPT = "ROMEO\n"
MODE_EVAL_TOKENS = 32768


def demo_configs(run: str, minutes: float) -> tuple[ModelConfig, TrainConfig]:
    # depth 4 at head dim 64: width 256, levels 64/128/256; attention and Mamba alternate (TMTM)
    model = ModelConfig(depth=4, head_dim=64, sequence_len=256, vocab_size=4096, block_pattern="TM")
    config = TrainConfig(run_name=run, data="embedded", tokenizer_vocab_size=4096, device_batch_size=8,
                         total_batch_size=2 * 8 * 256, eval_tokens=32768, eval_every=50,
                         num_iterations=100_000, time_budget_s=minutes * 60, matryoshka=True)
    return model, config


def run_demo(minutes: float = 8.0, run: str = "demo") -> None:
    started = time.perf_counter()
    model_config, config = demo_configs(run, minutes)
    result = train(model_config, config)

    checkpoint = load_checkpoint(result.checkpoint)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    data = TokenizedCorpus(open_corpus(config.data, config.text_field), tokenizer, config.val_fraction)
    modes = mode_rows(model, data, tokens=MODE_EVAL_TOKENS, batch_size=config.device_batch_size)
    engine = Engine(model, tokenizer)
    samples = [(f"{row.mode} ({model.config.compute_modes[row.modes[0]]} wide)",
                DEMO_PROMPT + engine.complete(DEMO_PROMPT, 96, SamplingParams(temperature=0.8, top_k=50), seed=0,
                                              compute=Compute(row.modes[0])))
               for row in modes]
    before, after = result.initial_val_bpb, result.final_val_bpb
    throughputs = sorted(m["tok_per_s"] for m in result.metrics if "loss" in m)
    summary = {
        "corpus": "Shakespeare's plays (embedded)",
        "training": f"Matryoshka, {config.matryoshka_rule} rule (every width trained each step)",
        "steps": str(result.step),
        "tokens seen": f"{result.step * config.total_batch_size:,}",
        "val bpb at init": f"{before:.4f}",
        "val bpb after training": f"{after:.4f}",
        "reduction": f"{100 * (before - after) / before:.1f}%",
        "median training throughput": f"{throughputs[len(throughputs) // 2]:,.0f} tok/s",
        "checkpoint": str(result.checkpoint),
        "wall time": f"{(time.perf_counter() - started) / 60:.1f} min",
    }
    table = markdown_table(modes)
    note = (f"FLOPs/token of a forward at context {model.config.sequence_len}, everything counted (attention at "
            f"its width, Mamba and lm_head at full width); val bpb on {MODE_EVAL_TOKENS:,} held-out tokens. "
            f"{INTERVAL_NOTE}")
    report = write_report(run, summary=summary, metrics=result.metrics, samples=samples,
                          model_description=model.config.describe(),
                          sections={"Compute modes": f"{note}\n\n{table}"})
    print0("\n=== one sample per compute mode (same prompt, same seed) ===")
    for heading, text in samples:
        print0(f"[{heading}]\n{text}\n{'-' * 40}")
    print0(f"\n=== compute modes ===\n{note}\n{table}\n")
    print0(f"val bpb: {before:.4f} at init -> {after:.4f} after training "
           f"({100 * (before - after) / before:.1f}% lower)")
    print0(f"report: {report}")
