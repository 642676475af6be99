"""`clex <command>`: a dict from command names to ordinary functions.

Each function's signature becomes the flags (``name: int = 3`` -> ``--name 3``; ``bool`` -> ``--name`` /
``--no-name``; ``list[...]`` / ``Sequence[...]`` -> several values; a sequence whose default is empty is
required; ``*args`` -> every word after the positionals, passed on as they are: ``clex serve MODEL --port 8000``), its docstring's first line the command's help and its ``Args:`` lines the flags' help (the one
source of each flag's text). ``clex --help`` and ``clex eval --help`` read only those first lines, with
``ast`` from the modules' source files: no pipeline (nor torch) is imported; the chosen command's module is
imported only to build its own flags and run it.

User mistakes (ValueError, a missing file) are one line ``clex: error: ...`` and exit code 2; ``--debug``
or ``CLEX_DEBUG=1`` shows the traceback instead. jsonargparse (litgpt's choice) was considered: it would add
a dependency and a config-file layer that ``clex train`` already has (YAML/TOML + key=value), to replace
about a hundred lines that do all we need, so the CLI stays hand-written.
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import importlib
import inspect
import json
import os
import re
import sys
import types
import typing
from pathlib import Path

#: command -> "module:function" (relative to the clex package)
COMMANDS = {
    "demo": "demo:run",
    "train": "train.loop:main",
    "eval ppl": "eval.perplexity:run_ppl",
    "eval passkey": "eval.retrieval:run_passkey",
    "eval needle": "eval.retrieval:run_needle",
    "eval ruler": "eval.ruler:run_ruler",
    "eval ruler-merge": "eval.ruler:merge_ruler",
    "eval compare": "eval.compare:run_compare",
    "plot freqs": "eval.plot:plot_freqs",
    "models smollm2": "data.smollm2:main",
    "export": "hf.export:run",
    "serve": "serve.server:run",
}
PACKAGE = Path(__file__).resolve().parent
SEQUENCES = (list, tuple, collections.abc.Sequence)


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(f"clex.{module}"), name)


def _source_doc(module: str, name: str | None = None) -> str:
    """The docstring of ``name`` in (or of) module ``clex.<module>``, read with ast: nothing is imported."""
    tree = ast.parse((PACKAGE / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
    if name is None:
        return ast.get_docstring(tree) or ""
    node = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name)
    return ast.get_docstring(node) or ""


def summary(command: str) -> str:
    """The first line of the docstring of ``command``'s function (from its source, without importing it)."""
    module, _, name = COMMANDS[command].partition(":")
    return _source_doc(module, name).split("\n", 1)[0]


def _arg_help(doc: str) -> dict[str, str]:
    """``name: text`` lines of a docstring's Args: section."""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)(?: \([^)]*\))?: (.+)$", section, re.M)}


def _add_arguments(parser: argparse.ArgumentParser, func) -> None:
    doc = inspect.getdoc(func) or ""
    helps = _arg_help(doc)
    hints = typing.get_type_hints(func)
    for name, param in inspect.signature(func).parameters.items():
        if param.kind is param.VAR_POSITIONAL:  # *args: every word after the positionals, passed through as is
            parser.add_argument(name, nargs=argparse.REMAINDER, help=helps.get(name, ""))
            continue
        if param.kind is param.VAR_KEYWORD:
            continue
        hint = hints.get(name, str)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):  # X | str | None -> X
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        flag = "--" + name.replace("_", "-")
        required = param.default is inspect.Parameter.empty
        text = helps.get(name, "")
        if not required and "(default" not in text and param.default not in (None, ()):
            text = f"{text} (default: {param.default!r})".strip()
        if param.kind is param.POSITIONAL_ONLY or (required and param.kind is param.POSITIONAL_OR_KEYWORD):
            parser.add_argument(name, type=_scalar(hint), help=text)
        elif hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default, help=text)
        elif origin in SEQUENCES or hint in SEQUENCES:
            parser.add_argument(
                flag,
                nargs="+",
                type=_scalar(args[0] if args else str),
                default=param.default,
                required=required or param.default in ((), []),
                metavar=name.upper(),
                help=text,
            )
        elif origin is dict or hint is dict:
            parser.add_argument(flag, type=json.loads, default=param.default, required=required, help=text + " (JSON)")
        else:
            parser.add_argument(flag, type=_scalar(hint), default=param.default, required=required, help=text)


def _scalar(hint):
    return hint if hint in (int, float, str) else str


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line: ``clex: error: <message> (see <prog> --help)``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"clex: error: {message} (see: {self.prog} --help)\n")


def chosen_command(argv: list[str]) -> str | None:
    """The command of ``argv`` (its leading words, global flags skipped), or None."""
    words = [a for a in argv if not a.startswith("-")][:2]
    for n in (2, 1):
        if " ".join(words[:n]) in COMMANDS:
            return " ".join(words[:n])
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``clex``; only the command named in ``argv`` (if any) gets its flags, so building it
    imports that command's module only (none for ``clex --help`` or ``clex eval --help``)."""
    chosen = chosen_command(list(sys.argv[1:] if argv is None else argv))
    from ._version import __version__

    parser = _Parser(prog="clex", description=_source_doc("__init__").split("\n", 1)[0])
    parser.add_argument("--version", action="version", version=f"clex {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: CLEX_DEBUG=1)")
    groups: dict[str, argparse._SubParsersAction] = {"": parser.add_subparsers(dest="command", metavar="COMMAND")}
    for command, target in COMMANDS.items():
        *group, leaf = command.split()
        prefix = " ".join(group)
        if prefix and prefix not in groups:
            parent = groups[""].add_parser(prefix, help=f"{prefix} commands")
            groups[prefix] = parent.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        if command != chosen:
            groups[prefix].add_parser(leaf, help=summary(command))
            continue
        func = _resolve(target)
        doc = inspect.getdoc(func) or ""
        sub = groups[prefix].add_parser(leaf, help=summary(command), description=doc.split("Args:")[0])
        _add_arguments(sub, func)
        sub.set_defaults(_func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    ns = parser.parse_args(argv)
    func = getattr(ns, "_func", None)
    if func is None:
        parser.print_help()
        return 2
    debug = ns.debug or os.environ.get("CLEX_DEBUG", "") not in ("", "0")
    kwargs = {k: v for k, v in vars(ns).items() if k not in ("_func", "command", "subcommand", "debug")}
    args = []
    params = inspect.signature(func).parameters.values()
    star = [p.name for p in params if p.kind is p.VAR_POSITIONAL]
    if star:  # the positionals before *args go by position
        before = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        args = [kwargs.pop(name) for name in before] + list(kwargs.pop(star[0]) or [])
    try:
        result = func(*args, **kwargs)
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        if debug:
            raise
        print(f"clex: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
