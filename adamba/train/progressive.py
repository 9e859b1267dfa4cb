"""`adamba progressive PLAN.toml`: run a growth plan (plan.py): its start, then each surgery and training stage in
order, each stage reading the checkpoint the previous one wrote. After every stage: val bpb on held-out data,
parameters and forward FLOPs/token (the one FLOP counter, model/flops.py), written as Markdown and JSON to
$ADAMBA_HOME/reports/<plan name>/progressive.{md,json} (rewritten after each stage, so a long plan shows how
far it got). Under torchrun, training and evaluation use every rank; surgeries run on rank 0 while the others
wait for its checkpoint."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from ..checkpoint import latest_checkpoint, load_checkpoint, resolve_run, run_dir, save_checkpoint, step_dir_name
from ..common import DistInfo, init_distributed, pick_device, print0, write_atomic
from ..data.corpus import open_corpus
from ..data.dataset import TokenizedCorpus
from ..eval.bpb import evaluate_bpb
from ..eval.report_files import report_dir
from ..nanochat import load_nanochat
from ..surgery import ops
from ..surgery.growth import load_source, max_logit_change, record, save_grown, source_config
from ..surgery.plan import Plan, check_params, format_rows, stage_row, start_config
from .trainer import train


class Progress:
    """Measures each stage's checkpoint and rewrites the report."""

    def __init__(self, plan: Plan):
        self.plan, self.rows = plan, []
        self.config = plan.train_config(run_name=plan.name)
        self.device = pick_device(self.config.device)
        self.info: DistInfo = init_distributed(self.device)
        self.data: TokenizedCorpus | None = None
        self.out = report_dir(plan.name)

    def measure(self, what: str, checkpoint: Path, tokens: int = 0, note: str = "") -> dict:
        ckpt = load_checkpoint(checkpoint, self.device)
        model = ckpt.model
        row = stage_row(len(self.rows), what, model.config, model.num_params()) | {
            "checkpoint": str(ckpt.path), "tokens": tokens, "note": note, "val_bpb": None}
        if ckpt.tokenizer is None:
            row["note"] = (note + "; " if note else "") + "no tokenizer.pkl, so no val bpb"
        else:
            if self.data is None or self.data.tokenizer.fingerprint != ckpt.tokenizer.fingerprint:
                self.data = TokenizedCorpus(open_corpus(self.config.data, self.config.text_field), ckpt.tokenizer,
                                            self.config.val_fraction)
            row["val_bpb"] = evaluate_bpb(model, self.data, batch_size=self.config.device_batch_size,
                                          seq_len=model.config.sequence_len, max_tokens=self.plan.eval_tokens,
                                          device=self.device, rank=self.info.rank,
                                          world_size=self.info.world_size)
        self.rows.append(row)
        self.write()
        print0(f"[{self.plan.name}] stage {row['stage']} {what}: {row['params']:,} parameters, "
               f"{row['flops_per_token']:.4g} FLOPs/token, val bpb "
               + (f"{row['val_bpb']:.4f}" if row["val_bpb"] is not None else "-"))
        return row

    def write(self) -> Path:
        path = self.out / "progressive.md"
        if not self.info.is_master:
            return path
        notes = [f"- stage {r['stage']} ({r['what']}): {r['note']}" for r in self.rows if r["note"]]
        text = "\n".join([f"# Growth plan `{self.plan.name}`", "", f"Plan: `{self.plan.path}`. After each stage: "
                          "val bpb on held-out data, parameters, forward FLOPs per token at the full context "
                          "(adamba/model/flops.py), tokens trained in the stage.", "", format_rows(self.rows),
                          "", *notes, ""])
        write_atomic(self.out / "progressive.json", json.dumps(self.rows, indent=2))
        return write_atomic(path, text)


def _on_rank0(info: DistInfo, run: str, write: Callable[[], object]) -> Path:
    """Run `write` (which saves step 0 of `run`) on rank 0 only; every rank returns that checkpoint's path."""
    if info.is_master:
        write()
    if info.enabled:
        dist.barrier()
    return run_dir(run) / step_dir_name(0)


def _start(plan: Plan, info: DistInfo, progress: bool) -> tuple[Path, int, str]:
    """(the starting checkpoint, tokens trained to make it, a note)."""
    start, run = plan.start, f"{plan.name}-00-start"
    if "checkpoint" in start:
        found = latest_checkpoint(resolve_run(start["checkpoint"]))
        if found is None:
            raise ValueError(f"plan {plan.path}: [start] checkpoint {start['checkpoint']} not found")
        return found, 0, ""
    config = start_config(plan)  # checks a nanochat folder against the plan's model table
    if "nanochat" in start:
        path = str(Path(start["nanochat"]).expanduser())

        def write():
            model, tokenizer = load_nanochat(path)
            save_checkpoint(run_dir(run), model, step=0, tokenizer=tokenizer, extra={"imported_from": path})
        return _on_rank0(info, run, write), 0, f"imported from nanochat {path}"
    train_config = plan.train_config(**start.get("train", {}), run_name=run)
    result = train(config, train_config, progress=progress)
    return result.checkpoint, result.step * result.tokens_per_step, "trained from scratch"


def run_plan(plan: Plan, progress: bool = True) -> list[dict]:
    """Run every stage of `plan`; returns the report's rows (also written under $ADAMBA_HOME/reports)."""
    report = Progress(plan)
    current, tokens, note = _start(plan, report.info, progress)
    check_params(plan.start.get("params"), report.measure("start", current, tokens, note)["params"],
                  f"plan {plan.path}: [start]")
    for k, step in enumerate(plan.steps, 1):
        run, started = f"{plan.name}-{k:02d}-{step.name}", time.perf_counter()
        if step.kind == "surgery":
            changes = []

            def grow(current=current, step=step, k=k, run=run, changes=changes):
                source = load_source(checkpoint=str(current))
                grown, new_blocks, settings = ops.perform(step.name, source.model, step.options)
                check_params(step.params, grown.num_params(), f"plan {plan.path}: stage {k} ({step.name})")
                changes.append(max_logit_change(source.model, grown))
                growth = record(step.name, source.model.config, new_blocks, source.growth, **settings)
                save_grown(run, grown, source.tokenizer, growth, str(current))
            current = _on_rank0(report.info, run, grow)
            tokens, note = 0, f"max |change of logits| {changes[0]:.2g}" if changes else ""
        else:
            config = plan.train_config(**step.options, run_name=run, init_from=str(current), stage=step.name)
            result = train(source_config(checkpoint=str(current)), config, progress=progress)
            current = result.checkpoint
            tokens, note = (result.step * result.tokens_per_step,
                            f"{result.stage}; {time.perf_counter() - started:.0f} s")
        report.measure(f"{step.kind} {step.name}", current, tokens, note)
    print0(f"report: {report.write()}")
    return report.rows
