"""A command's flags, choices and help, read from its function's source with ``ast``: nothing is imported.

Every command's flags are read from its function's source with ``ast``; nothing is imported to build them:

- the signature: ``name: int = 3`` -> ``--name 3``; ``bool`` -> ``--name`` / ``--no-name``; ``Sequence[X]`` /
  ``list[X]`` -> several values (numbers and names also comma-separated: ``--lengths 8192,16384``); a sequence
  whose default is empty is required; a parameter without a default -> a positional argument; ``*words`` ->
  positional words (``clex train [CONFIG] [KEY=VALUE ...]``); after positional parameters, ``*words`` takes every
  word that follows them, flags included, passed on as they are (``clex serve MODEL --port 8000``);
- ``typing.Literal[...]`` annotations -> the flag's choices, also through a name the module defines (``Protocol
  = Literal["sliding", "chunked"]``) or imports from another clex module; a value outside them is one line
  with the closest choice;
- the docstring: its first line -> the command's help, its text before ``Args:`` -> the description, its
  ``Args:`` lines -> each flag's help (the one source of each flag's text).

So ``clex --help``, ``clex eval ppl --help`` and a wrong choice take a fraction of a second: the chosen command's
module (and torch) is imported only to run it. A command must therefore be a plain ``def`` whose enumerated
parameters are annotated with ``Literal``; a default that is no literal (``tuple(TASKS)``) is left to the
function. ``clex train --help`` also lists every TrainConfig field with its default and meaning, read the same
way from the dataclass's source and comments.

jsonargparse (litgpt's choice) was considered: it would add a dependency and a config-file layer
that ``clex train`` already has (YAML/TOML + key=value), to replace about three hundred lines that do all we need,
so the CLI stays hand-written.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import io
import json
import tokenize
from dataclasses import dataclass
from pathlib import Path

#: the clex package, whose source is read
PACKAGE = Path(__file__).resolve().parent
_SEQUENCES = {"Sequence", "list", "tuple", "List", "Tuple", "Iterable"}
_SCALARS = {"int": int, "float": float, "str": str, "Path": str}


# --- reading the package's source, never importing it ---------------------------------------------------------


@functools.cache
def _tree(module: str) -> ast.Module:
    """The syntax tree of ``clex.<module>`` (a dotted path under the package)."""
    path = PACKAGE / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = PACKAGE / module.replace(".", "/") / "__init__.py"
    return ast.parse(path.read_text(encoding="utf-8"))


def source_doc(module: str, name: str | None = None) -> str:
    """The docstring of ``name`` in (or of) module ``clex.<module>``, read with ast: nothing is imported."""
    tree = _tree(module)
    return ast.get_docstring(tree if name is None else function_node(module, name)) or ""


def function_node(module: str, name: str) -> ast.FunctionDef:
    for node in _tree(module).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise LookupError(f"clex.{module} has no plain `def {name}` for the CLI to read")


def _imported_from(module: str, level: int, target: str | None) -> str | None:
    """The clex module (relative to the package) an ``ImportFrom`` in ``module`` names, or None outside clex."""
    if level == 0:
        return target.removeprefix("clex.") if target and target.startswith("clex.") else None
    package = module == "__init__" or (PACKAGE / module.replace(".", "/")).is_dir()
    parts = [] if module == "__init__" else module.split(".") if package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, *([target] if target else [])])


def _definition(module: str, name: str, depth: int = 0) -> tuple[str, ast.expr] | None:
    """(module, value) of the top-level ``name = value`` that ``module`` defines or imports from another clex
    module; None when it cannot be told from the source."""
    if depth > 5:
        return None
    for node in _tree(module).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return module, node.value
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return (module, node.value) if node.value is not None else None
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _imported_from(module, node.level, node.module)
                    return _definition(source, alias.name, depth + 1) if source else None
    return None


def _constants(module: str, node: ast.expr) -> list | None:
    """The constant values of a tuple/list/dict literal (a dict's keys), or of a name bound to one."""
    if isinstance(node, ast.Name):
        found = _definition(module, node.id)
        return _constants(*found) if found else None
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_constants(module, e) if isinstance(e, ast.Starred) else [e] for e in node.elts]
        if any(v is None for v in values):
            return None
        flat = [e.value if isinstance(e, ast.Starred) else e for v in values for e in v]
        out = []
        for e in flat:
            if isinstance(e, ast.Constant):
                out.append(e.value)
            elif isinstance(e, (str, int, float)):
                out.append(e)
            else:
                return None
        return out
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
        return [k.value for k in node.keys]
    if isinstance(node, ast.Starred):
        return _constants(module, node.value)
    return None


def _literal(module: str, node: ast.expr) -> list | None:
    """The values of ``Literal[...]`` (or of a name bound to one, here or in another clex module), else None."""
    if isinstance(node, ast.Name):
        found = _definition(module, node.id)
        return _literal(*found) if found else None
    if isinstance(node, ast.Subscript) and _name_of(node.value) == "Literal":
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        values = []
        for item in items:
            if isinstance(item, ast.Constant):
                values.append(item.value)
            else:
                more = _constants(module, item)
                if more is None:
                    return None
                values.extend(more)
        return values
    return None


def _name_of(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


@dataclass
class _Kind:
    """What a parameter's annotation asks of the CLI."""

    scalar: type = str
    sequence: bool = False
    boolean: bool = False
    mapping: bool = False
    choices: list | None = None


def _kind(module: str, node: ast.expr | None) -> _Kind:
    """The CLI kind of an annotation: ``X | None`` is X; a sequence wins over a plain ``str`` in a union
    (``Sequence[int] | str`` takes several ints); ``Literal`` gives choices."""
    if node is None:
        return _Kind()
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        return _kind(module, ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        members = [_kind(module, m) for m in _union_members(node)]
        members = [m for m in members if m is not None]
        return next((m for m in members if m.sequence), None) or next(
            (m for m in members if m.choices or m.boolean or m.mapping or m.scalar is not str), members[0]
        )
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    values = _literal(module, node)
    if values is not None:
        scalar = type(values[0]) if values and all(type(v) is type(values[0]) for v in values) else str
        return _Kind(scalar=scalar if scalar in (int, float, str) else str, choices=list(values))
    name = _name_of(node.value if isinstance(node, ast.Subscript) else node)
    if isinstance(node, ast.Subscript) and name in _SEQUENCES:
        item = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
        inner = _kind(module, item) or _Kind()
        return _Kind(scalar=inner.scalar, sequence=True, choices=inner.choices)
    if name in _SEQUENCES:
        return _Kind(sequence=True)
    if name in ("dict", "Mapping"):
        return _Kind(mapping=True)
    if name == "bool":
        return _Kind(boolean=True)
    return _Kind(scalar=_SCALARS.get(name, str))


def _union_members(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union_members(node.left) + _union_members(node.right)
    return [node]


# --- flags ----------------------------------------------------------------------------------------------------


def arg_help(doc: str) -> dict[str, str]:
    """``name: text`` lines of a docstring's Args: section (a line's continuation lines joined to it)."""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    section = section.split("\n\n", 1)[0] if "\n\n" in section.strip("\n") else section
    helps, current, indent = {}, None, None
    for line in section.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        depth = len(line) - len(line.lstrip())
        head, sep, text = stripped.partition(": ")
        name = head.split(" (")[0].lstrip("*")
        if sep and name.isidentifier() and (indent is None or depth <= indent):
            indent, current = depth, name
            helps[name] = text.strip()
        elif current is not None:
            helps[current] += " " + stripped
    return helps


def suggest(value, choices) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _converter(kind: _Kind, split: bool, many: bool):
    """argparse's ``type``: one word -> its value, or (``many``) a list of values, split at commas when ``split``;
    each converted and checked against the choices; a wrong one is an ArgumentTypeError (argparse's one-line
    error). (argparse also passes a flag's default through it when the default is a string.)"""

    def convert(word: str):
        items = [w.strip() for w in word.split(",") if w.strip()] if split else [word]
        out = []
        for item in items:
            try:
                value = kind.scalar(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid {kind.scalar.__name__} value: {item!r}") from None
            if kind.choices is not None and value not in kind.choices:
                shown = ", ".join(map(str, kind.choices))
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {shown}{suggest(item, kind.choices)}")
            out.append(value)
        return out if many else out[0]

    return convert


class _Extend(argparse.Action):
    """Several values, each word possibly holding several (commas): one flat list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [v for word in values for v in word])


def _choices_text(kind: _Kind) -> str:
    """The choices in the help text where the metavar cannot show them (many choices)."""
    if not kind.choices or len(kind.choices) <= 16:
        return ""
    return f" ({len(kind.choices)} choices, e.g. " + ", ".join(map(str, kind.choices[:3])) + ")"


def _metavar(name: str, kind: _Kind) -> str:
    if kind.choices and len(kind.choices) <= 16:
        return "{" + ",".join(map(str, kind.choices)) + "}"
    return name.upper()


def add_arguments(parser: argparse.ArgumentParser, module: str, func: ast.FunctionDef, doc: str) -> list[tuple]:
    """The flags of ``func``; -> [(name, how it is passed: "positional", "varargs" or "keyword")]."""
    helps = arg_help(doc)
    args = func.args
    plain = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(plain) - len(args.defaults)) + list(args.defaults)
    params = [
        (a, d, "positional" if a in args.posonlyargs or d is None else "keyword") for a, d in zip(plain, defaults)
    ]
    params += [(a, d, "keyword") for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    passing = []
    leading = [(a, d, how) for a, d, how in params if how == "positional" and d is None and a in plain]
    if args.vararg is not None and leading:  # f(model, *words): MODEL, then every word after it, flags included
        for arg, _, _ in leading:
            parser.add_argument(arg.arg, help=helps.get(arg.arg, ""), metavar=arg.arg.upper())
            passing.append((arg.arg, "positional"))
        params = [p for p in params if p not in leading]
        name = args.vararg.arg
        parser.add_argument(name, nargs=argparse.REMAINDER, default=[], metavar=name.upper(), help=helps.get(name))
        passing.append((name, "varargs"))
    elif args.vararg is not None:
        name = args.vararg.arg
        grammar, _, text = helps.get(name, "").partition(": ") if helps.get(name, "").startswith("[") else ("", "", "")
        parser.add_argument(name, nargs="*", default=[], metavar=grammar or name.upper(), help=text or helps.get(name))
        if grammar:
            parser.usage = f"{parser.prog} {grammar} [options]"
        passing.append((name, "varargs"))
    for arg, default, how in params:
        name = arg.arg
        kind = _kind(module, arg.annotation) or _Kind()
        text = helps.get(name, "") + _choices_text(kind)
        try:
            value = ast.literal_eval(default) if default is not None else None
            known = default is not None
        except ValueError:
            value, known = argparse.SUPPRESS, False  # not a literal: the function's own default applies
        if known and value not in (None, (), []) and "(default" not in text:
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            text = f"{text} (default: {shown})".strip()
        if how == "positional" and args.vararg is None and default is None:
            parser.add_argument(name, type=_converter(kind, False, False), help=text, metavar=name.upper())
            passing.append((name, "positional"))
            continue
        flag = "--" + name.replace("_", "-")
        if kind.boolean:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=text)
        elif kind.mapping:
            parser.add_argument(flag, type=json.loads, default=value, required=default is None, help=text + " (JSON)")
        elif kind.sequence:
            split = kind.scalar is not str or kind.choices is not None
            parser.add_argument(
                flag,
                nargs="+",
                type=_converter(kind, split, True),
                action=_Extend,
                default=value,
                required=default is None or value in ((), []),
                metavar=_metavar(name, kind),
                help=text,
            )
        else:
            parser.add_argument(
                flag,
                type=_converter(kind, False, False),
                default=value,
                required=default is None,
                metavar=_metavar(name, kind),
                help=text,
            )
        passing.append((name, "positional" if how == "positional" else "keyword"))
    return passing


# --- TrainConfig's fields, for `clex train --help` --------------------------------------------------------------


def dataclass_fields(module: str, name: str) -> list[tuple[str, str, str, str]]:
    """(section, field, default, meaning) of each field of dataclass ``name`` in ``clex.<module>``, read from its
    source: the default as written, the meaning from the field's comment (and the comment lines right below it);
    ``# --- title ---`` lines name the sections."""
    path = PACKAGE / (module.replace(".", "/") + ".py")
    source = path.read_text(encoding="utf-8")
    comments = {
        tok.start[0]: (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    cls = next(n for n in _tree(module).body if isinstance(n, ast.ClassDef) and n.name == name)
    rows, section = [], ""
    fields = [n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    first = fields[0].lineno if fields else cls.lineno
    for line in range(cls.lineno, first):
        text, alone = comments.get(line, ("", False))
        if alone and text.startswith("---"):
            section = text.strip("- ")
    for i, node in enumerate(fields):
        end = fields[i + 1].lineno if i + 1 < len(fields) else node.end_lineno + 1
        meaning = [comments[node.end_lineno][0]] if node.end_lineno in comments else []
        next_section = ""
        for line in range(node.end_lineno + 1, end):
            text, alone = comments.get(line, ("", False))
            if not alone:
                continue
            if text.startswith("---"):
                next_section = text.strip("- ")
            elif not next_section:
                meaning.append(text)
        rows.append((section, node.target.id, _default_text(node.value), " ".join(meaning)))
        section = next_section or section
    return rows


def _default_text(node: ast.expr | None) -> str:
    if isinstance(node, ast.Call) and _name_of(node.func) == "field":
        for kw in node.keywords:
            if kw.arg == "default_factory":
                factory = kw.value.body if isinstance(kw.value, ast.Lambda) else kw.value
                return {"dict": "{}", "list": "[]"}.get(_name_of(factory), ast.unparse(factory))
            if kw.arg == "default":
                return ast.unparse(kw.value)
    return ast.unparse(node) if node is not None else ""


def fields_epilog(module: str, name: str) -> str:
    rows = dataclass_fields(module, name)
    width = min(30, max(len(f"{field} = {default}") for _, field, default, _ in rows))
    lines, section = (
        [f"{name} fields (KEY=VALUE; clex.KEY=VALUE and rope.KEY=VALUE set one entry of a dict field):"],
        None,
    )
    for part, field, default, meaning in rows:
        if part != section:
            section = part
            lines.append(f"\n  {part}:" if part else "")
        head = f"{field} = {default}"
        if len(head) > width and meaning:
            lines += [f"    {head}", f"    {'':<{width}}  {meaning}"]
        else:
            lines.append(f"    {head:<{width}}  {meaning}".rstrip())
    return "\n".join(lines)
