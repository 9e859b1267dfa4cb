"""The `adamba surgery ...` commands (registered by adamba/cli.py; `adamba progressive`, which also trains, is
cli.py's own).

    adamba surgery add-mamba CKPT|--from-nanochat PATH [--pattern P] [--kind M|M2] --out RUN
    adamba surgery widen CKPT --width D' [--init zero|lora|copy-scale|svd] [--rank R] [--scale S] --out RUN
    adamba surgery deepen CKPT --pattern P --out RUN
    adamba surgery ... --dry-run         the new config and parameter counts, from metadata only
    adamba surgery plan PLAN.toml        every stage of a plan, parameter counts on the meta device
"""

from __future__ import annotations

import re

from . import ops
from .widen import INITS


def _source_arguments(parser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="adamba checkpoint folder, run folder, or run name")
    parser.add_argument("--from-nanochat", metavar="PATH", help="start from a nanochat checkpoint folder instead")
    parser.add_argument("--out", help="run name under $ADAMBA_HOME/checkpoints (or a folder) for the grown model")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the new config and parameter counts without reading or writing weights")


def add_commands(commands) -> None:
    surgery = commands.add_parser("surgery", help="grow a checkpoint without changing what it computes")
    ops_parser = surgery.add_subparsers(dest="surgery_command", required=True)
    am = ops_parser.add_parser("add-mamba", help="insert Mamba blocks, each an exact no-op at init")
    _source_arguments(am)
    am.add_argument("--pattern", help="the whole new block stack, e.g. 'TM*32' (default: a --kind block after "
                                      "every attention block)")
    am.add_argument("--kind", help="M (Mamba-1, the default) or M2 (Mamba-2)")
    wi = ops_parser.add_parser("widen", help="grow n_embd, heads, MLP neurons and Mamba d_inner exactly")
    _source_arguments(wi)
    wi.add_argument("--width", type=int, required=True, help="the new n_embd, a multiple of the head size")
    wi.add_argument("--init", choices=sorted(INITS), help="how the free new weights start (default zero; every "
                                                           "method preserves the function, see surgery/widen.py)")
    wi.add_argument("--rank", type=int, help="lora: rank of the product (default 8); svd: singular triplets kept "
                                             "(default all)")
    wi.add_argument("--scale", type=float, help="copy-scale: factor on copied matrices (default 0.1)")
    wi.add_argument("--seed", type=int, help="seed of the random new weights (default 0)")
    de = ops_parser.add_parser("deepen", help="insert blocks of any kind, each the identity at init")
    _source_arguments(de)
    de.add_argument("--pattern", required=True, help="the whole new block stack, e.g. 'TTMT' from 'TM'")
    pl = ops_parser.add_parser("plan", help="a plan's stages, parameter counts and per-GPU memory (a dry run: no "
                                            "weights)")
    pl.add_argument("plan", help="a plan TOML file (configs/plans/)")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs the memory plan divides FSDP's shards over")
    pl.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU the memory plan fits into")
    for parser in (am, wi, de, pl):
        parser.set_defaults(func=cmd_surgery)


def print_plan(path: str, gpus: int = 8, gpu_memory: float = 80) -> None:
    from .plan import dry_run, format_memory, format_rows, load_plan

    plan = load_plan(path)
    print(f"plan {plan.path} ({plan.name}): parameters counted by adamba's model code on the meta device")
    rows = dry_run(plan)
    print(format_rows(rows))
    print(f"\nper-GPU memory of training each stage on {gpus} GPUs of {gpu_memory:g} GiB (model/memory.py; "
          "activations estimated):")
    print(format_memory(plan, gpus, gpu_memory))


def cmd_surgery(args) -> None:
    from .growth import count_params, load_source, max_logit_change, record, save_grown, source_config
    from .plan import format_rows, stage_row

    op = args.surgery_command
    if op == "plan":
        print_plan(args.plan, args.gpus, args.gpu_memory)
        return
    names = {"add-mamba": ("pattern", "kind"), "widen": ("width", "init", "rank", "scale", "seed"),
             "deepen": ("pattern",)}[op]
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.dry_run:
        before = source_config(args.checkpoint, args.from_nanochat)
        after = ops.derive(op, before, options)
        print(format_rows([stage_row(0, "before", before, count_params(before)),
                           stage_row(1, op, after, count_params(after))]))
        return
    if not args.out:
        raise ValueError("--out: name the run (or a folder, with a '/') to write the grown checkpoint to")
    if "/" not in args.out and not re.fullmatch(r"[A-Za-z0-9._-]+", args.out):
        raise ValueError(f"--out: {args.out!r} is not a valid run name (use letters, digits, '.', '_', '-')")
    source = load_source(args.checkpoint, args.from_nanochat)
    grown, new_blocks, settings = ops.perform(op, source.model, options)
    change = max_logit_change(source.model, grown)
    saved = save_grown(args.out, grown, source.tokenizer,
                       record(op, source.model.config, new_blocks, source.growth, **settings), source.description)
    print(f"{op}: {source.description} ({source.model.num_params():,} parameters) -> {saved} "
          f"({grown.num_params():,} parameters)")
    print(f"  {grown.config.describe()}" + (f"; new blocks {new_blocks}" if new_blocks else ""))
    print(f"  max |change of logits| on a probe batch: {change:.2g} (float32 rounding only)")
