"""Growth plans: a TOML file listing surgeries and training stages in order (run by progressive.py).

    name = "tiny_cpu"             # runs are saved as <name>-<k>-<what> under $ADAMBA_HOME/checkpoints
    eval_tokens = 32768           # validation tokens per val-bpb evaluation after each stage

    [start]                       # where the plan starts, one of:
    checkpoint = "RUN"            #   an adamba run or checkpoint folder
    nanochat = "PATH"             #   a nanochat checkpoint folder; `model` is then its model_config, which a dry
                                  #   run uses when the folder is absent and a real run checks against the folder
    model = { depth = 2, ... }    #   alone: ModelConfig fields of a model trained from scratch, with `train`
    train = { num_iterations = 300 }
    params = 1234                 # optional: the expected parameter count (checked, dry run or not)

    [train]                       # TrainConfig fields shared by every training stage (and by evaluation: data,
    data = "embedded"             # val_fraction, device_batch_size, device)

    [[stage]]
    surgery = "add-mamba"         # add-mamba (pattern, kind), widen (width, init, rank, scale, seed),
    pattern = "TM*2"              # deepen (pattern); see `adamba surgery <op> --help`
    params = 1234                 # optional, checked

    [[stage]]
    train = "mamba-only"          # mamba-only, new-dims or all (train/stages.py)
    num_iterations = 100          # any other TrainConfig field, over [train]

`dry_run` derives every stage's config without reading a weight and counts parameters on the meta device with
our own model code; a count given in the plan that differs is an error naming the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TRAIN_STAGES, ModelConfig, TrainConfig, read_toml
from ..model import AdambaLM
from ..model.memory import GIB, plan_memory
from ..nanochat import generation_of, nanochat_config
from . import ops
from .growth import count_params, source_config

START_KEYS = {"checkpoint", "nanochat", "model", "train", "params"}
PLAN_KEYS = {"name", "eval_tokens", "start", "train", "stage"}
# TrainConfig fields the runner sets itself for each training stage
RUNNER_FIELDS = {"run_name", "init_from", "stage"}


@dataclass
class Step:
    kind: str  # "surgery" or "train"
    name: str  # the surgery ("add-mamba", "widen", "deepen") or the stage ("mamba-only", "new-dims", "all")
    options: dict  # surgery options, or TrainConfig overrides
    params: int | None = None  # the expected parameter count after a surgery


@dataclass
class Plan:
    name: str
    path: Path
    start: dict
    train: dict = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    eval_tokens: int = 32768

    def train_config(self, **fields) -> TrainConfig:
        return TrainConfig.from_dict({**self.train, **fields})


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a table, got {type(value).__name__}")
    return dict(value)


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    where = f"plan {path}"
    data = read_toml(path, "plan")
    unknown = sorted(set(data) - PLAN_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a plan has {sorted(PLAN_KEYS)}")
    name = data.get("name", path.stem)
    start = _table(data.get("start"), f"{where}: [start]")
    unknown = sorted(set(start) - START_KEYS)
    if unknown:
        raise ValueError(f"{where}: [start] has unknown key(s) {unknown}; use {sorted(START_KEYS)}")
    sources = [k for k in ("checkpoint", "nanochat") if k in start]
    if len(sources) > 1 or (not sources and "model" not in start):
        raise ValueError(f"{where}: [start] needs exactly one of checkpoint = RUN, nanochat = PATH, or a model table "
                         "to train from scratch")
    shared = _table(data.get("train", {}), f"{where}: [train]")
    reserved = sorted(RUNNER_FIELDS & set(shared))
    if reserved:
        raise ValueError(f"{where}: [train] sets {reserved}, which the plan sets for each stage itself")
    plan = Plan(name, path, start, shared, eval_tokens=data.get("eval_tokens", 32768))
    plan.train_config(run_name=name)  # bad shared fields fail now, not after hours of training
    stages = data.get("stage", [])
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{where}: no [[stage]] tables; a plan needs at least one surgery or training stage")
    for k, table in enumerate(stages, 1):
        at = f"{where}: stage {k}"
        options = _table(table, at)
        if ("surgery" in options) == ("train" in options):
            raise ValueError(f"{at}: give exactly one of surgery = 'add-mamba|widen|deepen' or train = "
                             f"'{'|'.join(TRAIN_STAGES)}'")
        if "surgery" in options:
            op = options.pop("surgery")
            params = options.pop("params", None)
            ops.check(op, options, at)
            plan.steps.append(Step("surgery", op, options, params))
        else:
            stage = options.pop("train")
            if stage not in TRAIN_STAGES:
                raise ValueError(f"{at}: unknown training stage {stage!r}; use one of {', '.join(TRAIN_STAGES)}")
            reserved = sorted(RUNNER_FIELDS & set(options))
            if reserved:
                raise ValueError(f"{at}: sets {reserved}, which the plan sets itself")
            try:
                plan.train_config(**options, run_name=name)
            except ValueError as err:
                raise ValueError(f"{at}: {err}") from None
            plan.steps.append(Step("train", stage, options))
    return plan


def start_config(plan: Plan) -> ModelConfig:
    """The starting model's config, from metadata only (a nanochat folder that is absent: the plan's table)."""
    start = plan.start
    if "checkpoint" in start:
        return source_config(checkpoint=start["checkpoint"])
    if "nanochat" in start:
        if Path(start["nanochat"]).expanduser().exists():
            config = source_config(nanochat=str(Path(start["nanochat"]).expanduser()))
            if "model" in start and nanochat_config({"model_config": start["model"]}, generation_of(config)) != config:
                raise ValueError(f"plan {plan.path}: [start] model {start['model']} is not the config of "
                                 f"{start['nanochat']} ({config.describe()})")
            return config
        if "model" not in start:
            raise ValueError(f"plan {plan.path}: [start] nanochat folder {start['nanochat']} is absent and no "
                             "model table gives its model_config")
        return nanochat_config({"model_config": start["model"]})
    return ModelConfig.from_dict(start["model"])


def check_params(expected: int | None, found: int, where: str) -> None:
    if expected is not None and expected != found:
        raise ValueError(f"{where}: the plan says params = {expected:,}, but the model has {found:,}")


def dry_run(plan: Plan) -> list[dict]:
    """Every stage's architecture and parameter count, derived without weights; checks the plan's counts."""
    config = start_config(plan)
    params = count_params(config)
    check_params(plan.start.get("params"), params, f"plan {plan.path}: [start]")
    rows = [stage_row(0, "start", config, params)]
    for k, step in enumerate(plan.steps, 1):
        if step.kind == "surgery":
            config = ops.derive(step.name, config, step.options)
            params = count_params(config)
            check_params(step.params, params, f"plan {plan.path}: stage {k} ({step.name})")
        rows.append(stage_row(k, f"{step.kind} {step.name}", config, params))
    return rows


def stage_row(k: int, what: str, config: ModelConfig, params: int) -> dict:
    """One row of a plan report: the architecture, parameters and forward FLOPs/token (model/flops.py)."""
    with torch.device("meta"):
        flops = AdambaLM(config).count_flops()
    return {"stage": k, "what": what, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "blocks": "".join(config.block_pattern), "params": params, "flops_per_token": flops.forward}


def format_memory(plan: Plan, gpus: int, gpu_memory: float) -> str:
    """Per-GPU GiB of training each stage under DDP and FSDP (model/memory.py), and whether it fits."""
    config = start_config(plan)
    stages = [("start", config, plan.train_config())]
    for step in plan.steps:
        if step.kind == "surgery":
            config = ops.derive(step.name, config, step.options)
            stages.append((f"surgery {step.name}", config, plan.train_config()))
        else:
            stages.append((f"train {step.name}", config, plan.train_config(**step.options)))
    lines = ["| stage | what | DDP GiB/GPU | fits | FSDP GiB/GPU | fits |", "|---|---|---:|---|---:|---|"]
    for k, (what, stage_config, train_config) in enumerate(stages):
        memory = plan_memory(stage_config, train_config, gpus)
        ddp, fsdp = (sum(parts.values()) / GIB for parts in (memory.ddp(), memory.fsdp()))
        lines.append(f"| {k} | {what} | {ddp:.1f} | {'yes' if ddp <= gpu_memory else 'no'} | {fsdp:.1f} | "
                     f"{'yes' if fsdp <= gpu_memory else 'no'} |")
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    """A Markdown table of stage rows (dry-run rows, or progressive.py's rows with val bpb)."""
    measured = any("val_bpb" in r for r in rows)
    head = "| stage | what | n_embd | layers | params | fwd FLOPs/token |" + (" val bpb | tokens |" if measured else "")
    lines = [head, "|" + "---|" * (8 if measured else 6)]
    for r in rows:
        line = (f"| {r['stage']} | {r['what']} | {r['n_embd']} | {r['n_layer']} | {r['params']:,} "
                f"| {r['flops_per_token']:.4g} |")
        if measured:
            bpb = f"{r['val_bpb']:.4f}" if r.get("val_bpb") is not None else "-"
            line += f" {bpb} | {r.get('tokens', 0):,} |"
        lines.append(line)
    return "\n".join(lines)
