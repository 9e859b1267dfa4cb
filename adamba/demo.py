"""The main job (`make demo`), the pipeline a nanochat user runs, on the embedded corpus in about a quarter of an
hour on 2 CPU cores: train the tokenizer (cached), pretrain a tiny Matryoshka hybrid (attention + Mamba, every
width trained), report val bpb before and after and the compute modes the one set of weights offers (width per
layer, FLOPs/token, val bpb, a sample each); then the chat half: score the base model on the offline chat tasks,
fine-tune it at full width on the offline mixture (arithmetic and letter counting through the calculator,
spelling, identity), score it again per compute mode, with tool execution switched off as the control, and
write one report of every stage. It ends by printing how to talk to the result."""

from __future__ import annotations

import time

from .checkpoint import load_checkpoint
from .common import print0
from .config import SFT_TRAIN_DEFAULTS, ModelConfig, SFTConfig, TrainConfig
from .data.corpus import open_corpus
from .data.dataset import TokenizedCorpus
from .eval.chat_eval import TaskScore, evaluate_task, markdown, write_chat_report
from .eval.elastic_report import INTERVAL_NOTE, markdown_table, mode_rows
from .infer.engine import Engine
from .infer.sampling import SamplingParams
from .model.compute import Compute
from .tasks.mixtures import eval_task, sft_mixture
from .tools.calculator import calculate
from .train.report import write_report
from .train.sft import sft
from .train.trainer import train

DEMO_PROMPT = "ROMEO\n"
MODE_EVAL_TOKENS = 32768
CHAT_TASKS = ("arithmetic", "counting", "spelling")
CONTROL_TASKS = ("arithmetic", "counting")  # the tasks the calculator answers: without it they should fail
CHAT_MODES = ("ghost", "normal", "full")
CHAT_ITEMS = 100  # held-out items per task and mode
ANSWER_TOKENS = 48  # a reply is a tool call, its output and one sentence


def demo_configs(run: str, minutes: float) -> tuple[ModelConfig, TrainConfig]:
    # depth 4 at head dim 64: width 256, levels 64/128/256; attention and Mamba alternate (TMTM). Today's nanochat
    # options that helped this hybrid in benchmarks/recipe.py (BENCHMARKS.md), not QK scale 1.2, which did not.
    model = ModelConfig(depth=4, head_dim=64, sequence_len=256, vocab_size=4096, block_pattern="TM",
                        value_embeds="alternating", residual_scalars=True, smear=True, backout=True)
    config = TrainConfig(run_name=run, data="embedded", tokenizer_vocab_size=4096, device_batch_size=8,
                         total_batch_size=2 * 8 * 256, eval_tokens=32768, eval_every=50,
                         num_iterations=100_000, time_budget_s=minutes * 60, matryoshka=True, muon="polar")
    return model, config


def sft_configs(run: str, base: str, minutes: float) -> tuple[SFTConfig, TrainConfig]:
    # nanochat's init_lr_frac (0.02) suits hours of SFT on a large model; minutes on a tiny one need far larger
    # steps (0.5: the format is learnt within ~100 steps). One micro-step per step: more, smaller updates.
    # Full width only: copying three-digit operands into the calculator call takes ~250 steps, which five minutes
    # buy at one pass per step; Matryoshka SFT (three passes: 110 steps) reached 0% arithmetic, the one-width
    # "sample" rule 13% (BENCHMARKS.md, "chat"). The narrow modes share the fine-tuned weights but were not
    # trained at their widths; the report shows what they answer.
    sft_config = SFTConfig(base=base, mixture="offline", init_lr_frac=0.5, val_conversations=64)
    config = TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS, "run_name": run, "device_batch_size": 8,
                                    "total_batch_size": 8 * 256, "eval_every": 50, "eval_tokens": 8192,
                                    "time_budget_s": minutes * 60})
    return sft_config, config


def run_demo(minutes: float = 5.0, sft_minutes: float = 5.0, run: str = "demo", items: int | None = None) -> None:
    started = time.perf_counter()
    items = items or CHAT_ITEMS
    model_config, config = demo_configs(run, minutes)
    result = train(model_config, config)
    checkpoint = load_checkpoint(result.checkpoint)
    modes_section, samples, pretrain_summary = _pretrain_report(checkpoint, config, result)

    print0("\n=== chat: the base model, before fine-tuning ===")
    before = _chat_scores(checkpoint, items, modes=("full",))
    sft_config, sft_train = sft_configs(f"{run}-sft", str(result.checkpoint), sft_minutes)
    train_set, val_set, _ = sft_mixture(sft_config.mixture, sft_train.seed, sft_config.val_conversations)
    tuned = sft(sft_config, sft_train, train_set, val_set)
    chat_model = load_checkpoint(tuned.checkpoint)
    print0("\n=== chat: after fine-tuning, per compute mode ===")
    after = _chat_scores(chat_model, items, modes=CHAT_MODES)
    control = _chat_scores(chat_model, items, modes=("full",), tasks=CONTROL_TASKS, tool=None, label="no tools")

    val_losses = [m["val_loss"] for m in tuned.metrics if "val_loss" in m]
    summary = {**pretrain_summary,
               "SFT": f"{tuned.step} steps of {sft_train.total_batch_size:,} tokens on the offline mixture "
                      f"({len(train_set):,} conversations), full width; val loss {val_losses[0]:.3f} -> "
                      f"{val_losses[-1]:.3f}",
               "chat checkpoint": str(tuned.checkpoint),
               "wall time": f"{(time.perf_counter() - started) / 60:.1f} min"}
    chat_md, _ = write_chat_report(f"{run}-sft", after + control, str(tuned.checkpoint),
                                   "Tool calls executed (calculator), except in the 'no tools' column.")
    chat_section = (f"Held-out items ({items} per task; no problem or word of them was trained on), answered "
                    f"greedily. FLOPs: every prompt and answer token at the mode's forward FLOPs.\n\n"
                    f"Base model (before SFT), full width:\n\n{markdown(before)}\n\nAfter SFT, per compute mode, "
                    f"and at full width with tool execution switched off (the control):\n\n"
                    f"{markdown(after + control)}\n\n![accuracy against FLOPs](../{chat_md.parent.name}/chat.png)")
    report = write_report(run, summary=summary, metrics=result.metrics, samples=samples,
                          model_description=checkpoint.model.config.describe(),
                          sections={"Compute modes": modes_section, "Chat": chat_section})
    print0(f"\n=== chat tasks after SFT (control: full width, tools off) ===\n{markdown(after + control)}\n")
    print0(f"report: {report}\nwall time: {summary['wall time']}")
    print0(f"talk to it:  adamba chat {run}-sft          (or: adamba chat {run}-sft -p 'What is 12 * 34?')")


def _pretrain_report(checkpoint, config: TrainConfig, result) -> tuple[str, list[tuple[str, str]], dict]:
    """The compute modes of the pretrained weights (table, a sample each) and the pretraining summary."""
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
        "pretraining": f"Matryoshka, {config.matryoshka_rule} rule (every width trained each step)",
        "steps": str(result.step),
        "tokens seen": f"{result.step * config.total_batch_size:,}",
        "val bpb at init": f"{before:.4f}",
        "val bpb after training": f"{after:.4f}",
        "reduction": f"{100 * (before - after) / before:.1f}%",
        "median training throughput": f"{throughputs[len(throughputs) // 2]:,.0f} tok/s",
        "checkpoint": str(result.checkpoint),
    }
    note = (f"FLOPs/token of a forward at context {model.config.sequence_len}, everything counted (attention at "
            f"its width, Mamba and lm_head at full width); val bpb on {MODE_EVAL_TOKENS:,} held-out tokens. "
            f"{INTERVAL_NOTE}")
    table = markdown_table(modes)
    print0("\n=== one sample per compute mode (same prompt, same seed) ===")
    for heading, text in samples:
        print0(f"[{heading}]\n{text}\n{'-' * 40}")
    print0(f"\n=== compute modes ===\n{note}\n{table}\n")
    print0(f"val bpb: {before:.4f} at init -> {after:.4f} after training "
           f"({100 * (before - after) / before:.1f}% lower)")
    return f"{note}\n\n{table}", samples, summary


def _chat_scores(checkpoint, items: int, *, modes, tasks=CHAT_TASKS, tool=calculate,
                 label: str | None = None) -> list[TaskScore]:
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    scores = []
    for mode in modes:
        compute = Compute.parse(model.config, width="" if mode == "full" else mode, names={"width": "modes"})
        for name in tasks:
            score = evaluate_task(model, tokenizer, eval_task(name), compute=compute, mode=label or mode,
                                  items=items, max_new_tokens=ANSWER_TOKENS, tool=tool)
            print0(f"  {score.task:<11} {score.mode:<8} {100 * score.accuracy:5.1f}% ({score.correct}/{score.total})")
            scores.append(score)
    return scores
