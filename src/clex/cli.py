"""`clex <command>`: a dict from command names to ordinary functions.

Each function's signature becomes the flags (``name: int = 3`` -> ``--name 3``; ``bool`` -> ``--name`` /
``--no-name``; ``list[...]`` -> several values), its docstring's first line the command's help and its
``Args:`` lines the flags' help. Functions are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import typing

#: command -> "module:function" (relative to the clex package)
COMMANDS = {
    "demo": "demo:run",
    "train": "train.loop:main",
    "eval ppl": "eval.perplexity:run_ppl",
    "eval passkey": "eval.retrieval:run_passkey",
    "eval needle": "eval.retrieval:run_needle",
    "plot freqs": "eval.plot:plot_freqs",
    "models smollm2": "sources.smollm2:main",
}


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(f"clex.{module}"), name)


def _arg_help(doc: str) -> dict[str, str]:
    """``name: text`` lines of a docstring's Args: section."""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)(?: \([^)]*\))?: (.+)$", section, re.M)}


def _add_arguments(parser: argparse.ArgumentParser, func) -> None:
    doc = inspect.getdoc(func) or ""
    helps = _arg_help(doc)
    hints = typing.get_type_hints(func)
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(name, str)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):  # X | None -> X
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        flag = "--" + name.replace("_", "-")
        required = param.default is inspect.Parameter.empty
        text = helps.get(name, "")
        if not required:
            text = f"{text} (default: {param.default!r})".strip()
        if param.kind is param.POSITIONAL_ONLY or (required and param.kind is param.POSITIONAL_OR_KEYWORD):
            parser.add_argument(name, type=_scalar(hint), help=text)
        elif hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default, help=text)
        elif origin in (list, tuple):
            parser.add_argument(flag, nargs="+", type=_scalar(args[0] if args else str), default=param.default,
                                required=required, help=text)  # fmt: skip
        elif origin is dict:
            parser.add_argument(flag, type=json.loads, default=param.default, required=required, help=text + " (JSON)")
        else:
            parser.add_argument(flag, type=_scalar(hint), default=param.default, required=required, help=text)


def _scalar(hint):
    return hint if hint in (int, float, str) else str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clex", description=(__import__("clex").__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"clex {__import__('clex').__version__}")
    groups: dict[str, argparse._SubParsersAction] = {"": parser.add_subparsers(dest="command", metavar="COMMAND")}
    parents: dict[str, argparse.ArgumentParser] = {}
    for command, target in COMMANDS.items():
        *group, leaf = command.split()
        prefix = " ".join(group)
        if prefix and prefix not in groups:
            parents[prefix] = groups[""].add_parser(prefix, help=f"{prefix} commands")
            groups[prefix] = parents[prefix].add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        func = _resolve(target)
        doc = inspect.getdoc(func) or ""
        sub = groups[prefix].add_parser(leaf, help=doc.splitlines()[0] if doc else "", description=doc.split("Args:")[0])
        _add_arguments(sub, func)
        sub.set_defaults(_func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    func = getattr(ns, "_func", None)
    if func is None:
        parser.print_help()
        return 2
    kwargs = {k: v for k, v in vars(ns).items() if k not in ("_func", "command", "subcommand")}
    try:
        result = func(**kwargs)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"clex: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
