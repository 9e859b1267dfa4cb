"""Command-line flags from config dataclasses: one --flag per field, its help from the field's comment."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing


def scalar_type(annotation) -> type:
    """The scalar type behind annotations like `int | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0] if args else str
    return annotation if annotation in (int, float, str, bool) else str


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def field_comments(cls) -> dict[str, str]:
    """The comment at the end of each field's line in the dataclass's source: the help text of its flag."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: flags keep their defaults only
        return {}
    comments, names = {}, {f.name for f in dataclasses.fields(cls)}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            name = token.line.split(":", 1)[0].strip()
            if name in names and token.line.strip() != token.string:
                comments[name] = token.string.lstrip("# ").strip()
    return comments


def add_config_flags(parser: argparse.ArgumentParser, cls, prefix: str, file_values: dict | None = None,
                     file_name: str | None = None, *, exclude=(), defaults: dict | None = None) -> None:
    """One --flag per dataclass field (but `exclude`); unset flags stay None so a config file's values survive.
    Each help line shows the value a run would get: the config file's (`file_values`, a TOML table), else the
    command's (`defaults`), else the dataclass's."""
    group = parser.add_argument_group(f"{cls.__name__} fields")
    hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = scalar_type(hints[f.name])
        if file_values and f.name in file_values:
            shown = f"(default: {file_values[f.name]!r}, from {file_name})"
        elif defaults and f.name in defaults:
            shown = f"(default: {defaults[f.name]!r})"
        else:
            shown = f"(default: {f.default!r})" if f.default is not dataclasses.MISSING else ""
        text = " ".join(t for t in (comments.get(f.name, ""), shown) if t)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"{prefix}{f.name}", default=None,
                           type=parse_bool if kind is bool else kind, metavar=kind.__name__.upper(),
                           help=text.replace("%", "%%") or None)


def config_overrides(args: argparse.Namespace, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def add_speculative_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speculative", default=None, metavar="DRAFT",
                        help="self-speculative decoding: the model's own narrow slice (ghost, whisper, a width) or its "
                             "first J blocks (exit:J) draft, the full model verifies; the output is the model's own")
    parser.add_argument("--draft-tokens", type=int, default=4, help="--speculative: tokens drafted per round (k)")


def speculative_draft(args: argparse.Namespace, config):
    """The draft `--speculative` / `--draft-tokens` ask for (None: plain decoding); errors name the flag."""
    from .infer.speculative import Draft

    if not args.speculative:
        return None
    try:
        return Draft.parse(config, args.speculative, k=args.draft_tokens)
    except ValueError as error:
        raise ValueError(f"--{error}") from None
