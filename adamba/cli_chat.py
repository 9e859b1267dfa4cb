"""The chat half of the command line: `adamba sft`, `adamba rl`, `adamba eval chat`, `adamba eval rl` and
`adamba chat`."""

from __future__ import annotations

from .cli_flags import add_config_flags, add_speculative_flags, config_overrides, speculative_draft
from .config import (
    RL_IGNORED,
    RL_PRESETS,
    RL_TRAIN_DEFAULTS,
    SFT_IGNORED,
    SFT_TRAIN_DEFAULTS,
    RLConfig,
    SFTConfig,
    TrainConfig,
)


def add_chat_commands(commands, eval_commands) -> None:
    sf = commands.add_parser("sft", help="fine-tune a checkpoint on conversations (chat format, tasks, tools)")
    sf.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    add_config_flags(sf, SFTConfig, "sft_")
    add_config_flags(sf, TrainConfig, "train_", exclude=SFT_IGNORED, defaults=SFT_TRAIN_DEFAULTS)
    sf.set_defaults(func=cmd_sft)

    rl = commands.add_parser("rl", help="reinforcement learning on verifiable rewards (GRPO) from a chat checkpoint")
    rl.add_argument("base", help="the chat checkpoint: run name, run folder or checkpoint folder")
    rl.add_argument("--preset", choices=sorted(RL_PRESETS), default=None,
                    help="start from these settings (flags still override): " +
                         "; ".join(f"{k}: {v}" for k, v in RL_PRESETS.items()))
    rl.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    add_config_flags(rl, RLConfig, "rl_", exclude=("base",))
    add_config_flags(rl, TrainConfig, "train_", exclude=RL_IGNORED, defaults=RL_TRAIN_DEFAULTS)
    rl.set_defaults(func=cmd_rl)

    ec = eval_commands.add_parser("chat", help="chat tasks at each compute mode: accuracy, ChatCORE and FLOPs "
                                               "spent; Markdown + PNG")
    ec.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
    ec.add_argument("--tasks", default="arithmetic,counting,spelling",
                    help="comma-separated task names (adamba/tasks/mixtures.py: EVAL_TASKS)")
    ec.add_argument("--modes", default="full", help="comma-separated compute modes or widths (full = full width)")
    ec.add_argument("--items", type=int, default=None, help="items per task (default: all)")
    ec.add_argument("--batch-size", type=int, default=8)
    ec.add_argument("--max-tokens", type=int, default=64, help="longest generated answer")
    ec.add_argument("--no-tools", action="store_true", help="do not execute tool calls (for the control)")
    ec.add_argument("--device", default="auto")
    ec.set_defaults(func=cmd_eval_chat)

    er = eval_commands.add_parser("rl", help="compute-aware RL runs side by side: held-out pass@1 against FLOPs "
                                             "per answer over the FLOPs price; Markdown + PNG")
    er.add_argument("runs", nargs="+", help="RL run names or folders (each run with --flops-price)")
    er.add_argument("--name", default="rl-price", help="report folder name under $ADAMBA_HOME/reports")
    er.set_defaults(func=cmd_eval_rl)

    sv = commands.add_parser("serve", help="an OpenAI-compatible server with continuous batching and a web UI")
    sv.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8, help="rows generated together (slots of the batch)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on /v1 and /metrics")
    sv.add_argument("--name", default=None, help="the model id clients use (default: the run's name)")
    sv.add_argument("--no-tools", action="store_true", help="do not execute the calculator in chat replies")
    sv.add_argument("--compile", action="store_true", help="compiled decode steps (torch.compile; fixed widths)")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--devices", default=None, help="comma-separated devices, one scheduler and model copy each "
                                                    "(e.g. cuda:0,cuda:1); requests go to the least busy")
    sv.set_defaults(func=cmd_serve)

    ch = commands.add_parser("chat", help="talk to a chat model: streaming replies, /mode, /clear, /system")
    ch.add_argument("checkpoint", help="checkpoint folder, run folder, or run name")
    ch.add_argument("-p", "--prompt", default=None, help="one message, one reply, then exit")
    ch.add_argument("--mode", default="", help="compute mode or width (default: full)")
    ch.add_argument("--temperature", type=float, default=0.6)
    ch.add_argument("--top-k", type=int, default=50)
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--no-tools", action="store_true", help="do not execute the calculator")
    add_speculative_flags(ch)
    ch.add_argument("--device", default="auto")
    ch.set_defaults(func=cmd_chat)


def _load(args):
    from .checkpoint import load_checkpoint, resolve_run
    from .common import pick_device

    ckpt = load_checkpoint(resolve_run(args.checkpoint), pick_device(args.device))
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.path}: the checkpoint has no tokenizer.pkl; chat needs one")
    return ckpt


def cmd_sft(args) -> None:
    from .common import print0
    from .tasks.mixtures import chat_eval_callback, sft_mixture
    from .train.sft import sft

    sft_config = SFTConfig.from_dict(config_overrides(args, "sft_"))
    config = TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS, **config_overrides(args, "train_")})
    train_set, val_set, eval_tasks = sft_mixture(sft_config.mixture, config.seed, sft_config.val_conversations)
    result = sft(sft_config, config, train_set, val_set, resume=args.resume,
                 chat_eval=chat_eval_callback(eval_tasks, sft_config.chat_eval_items))
    print0(f"finished at step {result.step}; checkpoint {result.checkpoint}")


def cmd_rl(args) -> None:
    from .common import print0
    from .tasks.mixtures import rl_task
    from .train.rl import rl

    rl_config = RLConfig.from_dict({**RL_PRESETS.get(args.preset, {}), **config_overrides(args, "rl_"),
                                    "base": args.base})
    config = TrainConfig.from_dict({**RL_TRAIN_DEFAULTS, **config_overrides(args, "train_")})
    print0("rl settings: " + ", ".join(f"{k}={v!r}" for k, v in rl_config.to_dict().items()))
    train_task, eval_task = rl_task(rl_config.task, config.seed)
    result = rl(rl_config, config, train_task, eval_task, resume=args.resume)
    print0(f"finished at step {result.step}; checkpoint {result.checkpoint}")


def cmd_eval_chat(args) -> None:
    from .eval.chat_eval import evaluate_task, markdown, write_chat_report
    from .model.compute import Compute
    from .tasks.mixtures import eval_task
    from .tools.calculator import calculate

    ckpt = _load(args)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    tasks = [eval_task(name) for name in args.tasks.split(",") if name]
    scores = []
    for mode in args.modes.split(","):
        compute = Compute.parse(model.config, width="" if mode == "full" else mode, names={"width": "--modes"})
        for task in tasks:
            scores.append(evaluate_task(model, tokenizer, task, compute=compute, mode=mode, items=args.items,
                                        batch_size=args.batch_size, max_new_tokens=args.max_tokens,
                                        tool=None if args.no_tools else calculate))
    print(markdown(scores))
    note = "Tool calls were not executed (control)." if args.no_tools else "Tool calls executed (calculator)."
    md, _ = write_chat_report(ckpt.path.parent.name, scores, str(ckpt.path), note)
    print(f"report: {md}")


def cmd_eval_rl(args) -> None:
    import json

    from .checkpoint import latest_checkpoint, read_meta, resolve_run
    from .eval.rl_report import write_price_report

    runs = []
    for name in args.runs:
        folder = resolve_run(name)
        folder = folder if (folder / "metrics.jsonl").exists() else folder.parent
        checkpoint = latest_checkpoint(folder)
        if checkpoint is None or not (folder / "metrics.jsonl").exists():
            raise ValueError(f"runs: {name} is not an RL run folder (no checkpoint and metrics.jsonl in {folder})")
        meta = read_meta(checkpoint)
        price = meta["extra"].get("rl", {}).get("flops_price")
        if price is None:
            raise ValueError(f"runs: {name} was not compute-aware (no flops_price); run `adamba rl` with "
                             "--flops-price")
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        runs.append((folder.name, float(price), int((meta.get("train_config") or {}).get("seed", 0)), records))
    md, _ = write_price_report(args.name, runs)
    print(md.read_text())
    print(f"report: {md}")


def cmd_serve(args) -> None:
    import uvicorn

    from .serve.api import create_app

    ckpt = _load(args)
    name = args.name or ckpt.path.parent.name
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    app = create_app(ckpt.model, ckpt.tokenizer, name, max_batch=args.max_batch, max_queue=args.max_queue,
                     api_key=args.api_key, tools=not args.no_tools, devices=devices, compile=args.compile)
    print(f"serving {name} on http://{args.host}:{args.port} (web UI at /, OpenAI API at /v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def cmd_chat(args) -> None:
    from .chat.session import ChatSession
    from .infer.sampling import SamplingParams
    from .tools.calculator import calculate

    ckpt = _load(args)
    session = ChatSession(ckpt.model, ckpt.tokenizer, tool=None if args.no_tools else calculate,
                          params=SamplingParams(args.temperature, args.top_k), max_new_tokens=args.max_tokens,
                          seed=args.seed, speculative=speculative_draft(args, ckpt.model.config))
    if args.mode:
        session.set_mode(args.mode)
    if args.prompt is not None:
        _print_reply(session, args.prompt)
        return
    print(f"chatting with {ckpt.path} ({ckpt.model.config.describe()}); /mode M, /clear, /system TEXT, /quit")
    while True:
        try:
            line = input("> ")
        except EOFError:  # end of input (Ctrl-D, or a piped script)
            break
        if not _handle(session, line.strip()):
            break


def _handle(session, line: str) -> bool:
    """One line of the REPL; False ends it."""
    if line in ("/quit", "/exit"):
        return False
    if line.startswith("/mode"):
        try:
            print(f"mode: {session.set_mode(line[5:].strip())}")
        except ValueError as err:
            print(f"error: {err}")
    elif line == "/clear":
        session.clear()
        print("history cleared")
    elif line.startswith("/system"):
        session.system = line[7:].strip() or None
        print(f"system message {'set' if session.system else 'cleared'}")
    elif line.startswith("/"):
        print("commands: /mode M, /clear, /system TEXT, /quit")
    elif line:
        _print_reply(session, line)
    return True


def _print_reply(session, text: str) -> None:
    try:
        for event in session.reply(text):
            if event.kind == "text":
                print(event.text, end="", flush=True)
            elif event.kind == "tool":
                result = event.call.result if event.call.result is not None else "(refused)"
                print(f" [calculator: {event.call.expression} = {result}] ", end="", flush=True)
            else:
                print(f"\n[{event.text}]", flush=True)
    except ValueError as err:
        print(f"error: {err}", flush=True)
    print(flush=True)

