"""`clex <command>`: a dict from command names to ordinary functions.

The flags of each command come from its function's source (:mod:`clex.flags`, without importing it), so ``clex
--help``, ``clex eval ppl --help`` and a wrong choice take a fraction of a second: the chosen command's module (and
torch) is imported only to run it.

User mistakes (ValueError, a missing file) are one line ``clex: error: ...`` and exit code 2; ``--debug``
or ``CLEX_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys

from .flags import add_arguments, fields_epilog, function_node, source_doc, suggest

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
#: flags of earlier releases -> the one word each idea has now (said when an old flag is used)
RENAMED = {
    "--fresh": "--overwrite",
    "--quick": "--scale quick",
    "--force": "--overwrite",
    "--trials": "--samples",
    "--out": "--out-dir and --name",
    "--config": "the config file as the first word: clex train CONFIG [KEY=VALUE ...]",
    "--override": "KEY=VALUE words after the config file: clex train CONFIG [KEY=VALUE ...]",
}
# --- the parser -----------------------------------------------------------------------------------------------


def summary(command: str) -> str:
    """The first line of the docstring of ``command``'s function (from its source, without importing it)."""
    module, _, name = COMMANDS[command].partition(":")
    return source_doc(module, name).split("\n", 1)[0]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line: ``clex: error: <message> (see <prog> --help)``, exit code 2; an
    unknown flag gets the closest known one (or its new name, for a flag of an earlier release)."""

    leaf: argparse.ArgumentParser | None = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--out` is not `--out-dir`: a flag is named in full or refused
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            flag = next((w for w in message.split(":", 1)[1].split() if w.startswith("--")), None)
            flag = flag.split("=")[0] if flag else None
            target = self.leaf or self
            known = [s for a in target._actions for s in a.option_strings if s.startswith("--")]
            if flag in RENAMED:
                message += f" ({flag} is now {RENAMED[flag]})"
            elif flag:
                message += suggest(flag, known).replace("did you mean '", "did you mean ").replace("'?", "?")
        prog = (self.leaf or self).prog
        self.exit(2, f"clex: error: {message} (see: {prog} --help)\n")


def chosen_command(argv: list[str]) -> str | None:
    """The command of ``argv`` (its leading words, global flags skipped), or None."""
    words = [a for a in argv if not a.startswith("-")][:2]
    for n in (2, 1):
        if " ".join(words[:n]) in COMMANDS:
            return " ".join(words[:n])
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``clex``; only the command named in ``argv`` (if any) gets its flags. Nothing is imported:
    flags, choices and help come from the source (module docstring)."""
    chosen = chosen_command(list(sys.argv[1:] if argv is None else argv))
    from ._version import __version__

    parser = _Parser(prog="clex", description=source_doc("__init__").split("\n", 1)[0])
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
        module, _, name = target.partition(":")
        node = function_node(module, name)
        doc = ast.get_docstring(node) or ""
        sub = groups[prefix].add_parser(
            leaf,
            help=summary(command),
            description=doc.split("Args:")[0].strip(),
            epilog=fields_epilog("train.config", "TrainConfig") if command == "train" else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(_target=target, _passing=add_arguments(sub, module, node, doc))
        parser.leaf = sub
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    ns = parser.parse_args(argv)
    target = getattr(ns, "_target", None)
    if target is None:
        parser.print_help()
        return 2
    debug = ns.debug or os.environ.get("CLEX_DEBUG", "") not in ("", "0")
    values = vars(ns)
    args, kwargs = [], {}
    for name, how in ns._passing:
        if name not in values:  # a default the function keeps (SUPPRESS)
            continue
        if how == "varargs":
            args.extend(values[name])
        elif how == "positional":
            args.append(values[name])
        else:
            kwargs[name] = values[name]
    try:
        module, _, name = target.partition(":")
        func = getattr(importlib.import_module(f"clex.{module}"), name)
        result = func(*args, **kwargs)
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        if debug:
            raise
        print(f"clex: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
