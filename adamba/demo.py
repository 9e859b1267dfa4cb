"""The main job (`make demo`): on the embedded corpus, train the tokenizer (cached), pretrain a tiny model
for a few minutes, report val bpb before and after, write a run report and print samples."""

from __future__ import annotations

import time

from .checkpoint import load_checkpoint
from .common import print0
from .config import ModelConfig, TrainConfig
from .infer.engine import Engine
from .infer.sampling import SamplingParams
from .train.report import write_report
from .train.trainer import train

DEMO_PROMPTS = ["ROMEO\n", "To be, or not to be", "Enter KING"]


def demo_configs(run: str, minutes: float) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(depth=4, head_dim=64, sequence_len=256, vocab_size=4096)
    config = TrainConfig(run_name=run, data="embedded", tokenizer_vocab_size=4096, device_batch_size=8,
                         total_batch_size=2 * 8 * 256, eval_tokens=32768, eval_every=50,
                         num_iterations=100_000, time_budget_s=minutes * 60)
    return model, config


def run_demo(minutes: float = 5.0, run: str = "demo") -> None:
    started = time.perf_counter()
    model_config, config = demo_configs(run, minutes)
    result = train(model_config, config)

    checkpoint = load_checkpoint(result.checkpoint)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    engine = Engine(model, tokenizer)
    samples = [(p, engine.complete(p, 96, SamplingParams(temperature=0.8, top_k=50), seed=i))
               for i, p in enumerate(DEMO_PROMPTS)]
    before, after = result.initial_val_bpb, result.final_val_bpb
    throughputs = sorted(m["tok_per_s"] for m in result.metrics if "loss" in m)
    summary = {
        "corpus": "Shakespeare's plays (embedded)",
        "steps": str(result.step),
        "tokens seen": f"{result.step * config.total_batch_size:,}",
        "val bpb at init": f"{before:.4f}",
        "val bpb after training": f"{after:.4f}",
        "reduction": f"{100 * (before - after) / before:.1f}%",
        "median training throughput": f"{throughputs[len(throughputs) // 2]:,.0f} tok/s",
        "checkpoint": str(result.checkpoint),
        "wall time": f"{(time.perf_counter() - started) / 60:.1f} min",
    }
    report = write_report(run, summary=summary, metrics=result.metrics, samples=samples,
                          model_description=model.config.describe())
    print0("\n=== samples ===")
    for prompt, text in samples:
        print0(f"{prompt}{text}\n{'-' * 40}")
    print0(f"val bpb: {before:.4f} at init -> {after:.4f} after training "
           f"({100 * (before - after) / before:.1f}% lower)")
    print0(f"report: {report}")
