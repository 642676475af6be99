"""The documentation stays true: every repository path it mentions exists, every `clex <command>` it shows is a
command with the flags it shows, every `clex.NAME` it names exists, and the site documents the whole public API.

Read: README.md, every page of docs/ and every README of experiments/. A path counts when it starts at a top-level
folder of the repository (``experiments/ruler/run.sh``), with ``<...>``, ``*``, ``{a,b}`` and all-capital words
(``recipes/smollm2-RECIPE.yaml``) as placeholders; a Markdown link counts relative to its page (``/...``: to the
repository root, as GitHub and the docs site read it). A command counts where it stands at the start of a shell
command (in a code block or an inline code span), and a Python name wherever ``clex.NAME`` is not a configuration
key (``clex.max_factor=8``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import importlib
import re
from pathlib import Path

import pytest

import clex
from clex.cli import COMMANDS, build_parser
from clex.core.config import CLEXConfig
from clex.hf.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "experiments").rglob("README.md")],
    key=lambda p: p.as_posix(),
)
TOP = ("src", "tests", "experiments", "benchmarks", "recipes", "configs", "scripts", "docs", "examples", ".ci")
ROOT_FILES = ("pyproject.toml", "constraints.txt", "mkdocs.yml", ".pre-commit-config.yaml", "LICENSE")
GLOBAL_FLAGS = {"--help", "--version", "--debug"}

#: What the documentation already says in the CLI's final vocabulary, which another branch is bringing in
#: (`--overwrite` the one flag that replaces output, `--out-dir`/`--name` for every output, `--samples` for samples
#: per cell, `clex train CONFIG [KEY=VALUE ...]`), and what other branches add (none at present).
#: Each is an expected failure here; once its branch is merged it passes, `test_pending` reports it as XPASS
#: (strict: a failure), and its line below is to be deleted.
PENDING: dict[str, str] = {}


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


# --- reading the pages ----------------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1\s*$", re.S | re.M)


def code_segments(text: str) -> list[str]:
    """Shell-like segments: each logical line of a fenced block (backslash continuations joined; an indented
    block of four spaces counts as code too) and each inline code span outside the blocks."""
    segments = []
    for m in FENCE.finditer(text):
        segments += re.sub(r"\\\n\s*", " ", m.group(2)).splitlines()
    prose = FENCE.sub("", text)
    indented = re.findall(r"(?:^(?: {4}|\t).*\n?)+", prose, re.M)
    for block in indented:
        segments += re.sub(r"\\\n\s*", " ", block).splitlines()
        prose = prose.replace(block, "")
    segments += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    return segments


def clex_invocations(segment: str) -> list[list[str]]:
    """The argument lists of every `clex ...` that stands where a shell command starts in ``segment``."""
    found = []
    for part in re.split(r"&&|\|\||;|\$\(|\s\|\s", segment):
        words = part.split()
        while words and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]) or words[0] in ("nohup", "time")):
            words.pop(0)
        if words and words[0] == "clex":
            found.append(words[1:])
    return found


def command_of(args: list[str]) -> tuple[str | None, str | None]:
    """(the command ``args`` name, or None for ``clex --help``-like calls; an error, or None)."""
    words = []
    for a in args:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", a):
            break
        words.append(a)
    for n in (2, 1):
        if " ".join(words[:n]) in COMMANDS:
            return " ".join(words[:n]), None
    groups = {c.split()[0] for c in COMMANDS if " " in c}
    if not words or (words[0] in groups and len(words) == 1):
        return None, None
    return None, f"clex {' '.join(words[:2] if words[0] in groups else words[:1])}"


@functools.cache
def flags_of(command: str) -> frozenset[str]:
    return frozenset(o for a in _leaf(command)._actions for o in a.option_strings) | GLOBAL_FLAGS


def _leaf(command: str) -> argparse.ArgumentParser:
    sub = build_parser(command.split())
    for word in command.split():
        action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        sub = action.choices[word]
    return sub


@functools.cache
def passes_through(command: str) -> bool:
    """Whether the command hands every word after its positionals to another program (argparse.REMAINDER)."""
    return any(a.nargs == argparse.REMAINDER for a in _leaf(command)._actions)


def own_words(command: str, args: list[str]) -> list[str]:
    """The words up to the command's first positional (its flags, with their values); what follows is passed on."""
    words = args[len(command.split()) :]
    valued = {o for a in _leaf(command)._actions if a.nargs != 0 for o in a.option_strings}
    for i, word in enumerate(words):
        if not word.startswith("-") and (i == 0 or words[i - 1].split("=")[0] not in valued or "=" in words[i - 1]):
            return words[:i]
    return words


def cli_problems(text: str) -> set[str]:
    problems = set()
    for segment in code_segments(text):
        for args in clex_invocations(segment):
            command, error = command_of(args)
            if error:
                problems.add(error)
                continue
            allowed = flags_of(command) if command else GLOBAL_FLAGS
            if command and passes_through(command):  # `clex serve [flags] MODEL [another program's flags]`
                args = own_words(command, args)
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(args)):
                if flag not in allowed:
                    problems.add(f"clex {command} {flag}" if command else f"clex {flag}")
    return problems


def python_names(text: str) -> set[str]:
    """Every ``clex.NAME[.NAME...]`` that is not a configuration key (``clex.max_factor=8``) or a placeholder
    (``clex.NAME``)."""
    names = set()
    for m in re.finditer(r"(?<![\w./-])clex((?:\.[A-Za-z_]\w*)+)", text):
        placeholder = any(re.fullmatch(r"[A-Z][A-Z0-9_]*", part) for part in m.group(1).split(".")[1:])
        if not placeholder and not re.match(r"[\w-]*=", text[m.end() :]):
            names.add("clex" + m.group(1))
    return names


def resolves(dotted: str) -> bool:
    obj, path = clex, "clex"
    for part in dotted.split(".")[1:]:
        path += "." + part
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:
                obj = importlib.import_module(path)
            except ModuleNotFoundError:
                return False
    return True


def _scan_path(text: str, start: int) -> str:
    """The path that starts at ``start``: path characters, ``{...}`` groups (commas inside) and ``<...>``."""
    i = start
    while i < len(text):
        c = text[i]
        if c in "{<":
            close = text.find("}" if c == "{" else ">", i)
            if close < 0:
                break
            i = close + 1
        elif re.match(r"[\w./*@+-]", c):
            i += 1
        else:
            break
    return text[start:i].rstrip(".")


def _expand(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [
        p for alt in m.group(1).split(",") for p in _expand(pattern[: m.start()] + alt.strip() + pattern[m.end() :])
    ]


def path_exists(path: str, base: Path = ROOT) -> bool:
    pattern = re.sub(r"<[^>]*>", "*", path)
    pattern = re.sub(r"\b(?!README\b|LICENSE\b)[A-Z][A-Z0-9_]+\b", "*", pattern)
    return all(glob.glob(str(base / p)) for p in _expand(pattern))


def path_problems(page: Path) -> set[str]:
    text = _text(page)
    problems = set()
    starts = "|".join(re.escape(t) for t in TOP)
    for m in re.finditer(rf"(?<![\w./$~-])(?:{starts})/", text):
        path = _scan_path(text, m.start())
        if not path_exists(path):
            problems.add(path)
    for m in re.finditer(r"(?<![\w./$~-])(" + "|".join(map(re.escape, ROOT_FILES)) + r")\b", text):
        if not (ROOT / m.group(1)).exists():
            problems.add(m.group(1))
    for target in re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        target = target.split("#")[0]
        base = ROOT if target.startswith("/") else page.parent
        if not path_exists(target.lstrip("/"), base):
            problems.add(f"link {target}")
    return problems


# --- the tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_paths_and_links_exist(page):
    problems = path_problems(page)
    assert not problems, f"{_name(page)} names paths that do not exist: {sorted(problems)}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_commands_and_flags_exist(page):
    problems = cli_problems(_text(page)) - set(PENDING)
    assert not problems, f"{_name(page)}: no such command or flag: {sorted(problems)}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_python_names_exist(page):
    missing = {n for n in python_names(_text(page)) if n not in PENDING and not resolves(n)}
    assert not missing, f"{_name(page)} names {sorted(missing)}, which clex does not have"


def _pending_ok(item: str) -> bool:
    """Whether the code has what a PENDING item expects."""
    if item == "clex train CONFIG":
        sub = build_parser(["train"])
        action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        return any(not a.option_strings for a in action.choices["train"]._actions)
    if item.startswith("clex."):
        return resolves(item)
    words = item.split()[1:]
    flag = words.pop() if words[-1].startswith("--") else None
    command = " ".join(words)
    return command in COMMANDS and (flag is None or flag in flags_of(command))


def test_every_pending_item_is_one_the_docs_make():
    """An item of PENDING that the code does not have yet must still be in the documentation (else it is stale)."""
    text = "\n".join(map(_text, PAGES))
    made = cli_problems(text) | {n for n in python_names(text) if not resolves(n)}
    if re.search(r"clex train (CONFIG|recipes/)", text):
        made.add("clex train CONFIG")
    stale = {item for item in PENDING if item not in made and not _pending_ok(item)}
    assert not stale, f"PENDING lists {sorted(stale)}, which the documentation no longer says"


@pytest.mark.parametrize(
    "item", [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=v)) for k, v in PENDING.items()]
)
def test_pending(item):
    assert _pending_ok(item)


def test_the_docs_name_every_command_method_and_config_field():
    cli, training = _text(ROOT / "docs" / "cli.md"), _text(ROOT / "docs" / "training.md")
    for command in COMMANDS:
        assert f"`clex {command}" in cli, command
    for method in METHODS:
        assert f"`{method}`" in training, method
    how = _text(ROOT / "docs" / "how-it-works.md")
    for field in dataclasses.fields(CLEXConfig):
        assert f"`{field.name}`" in how, field.name


def test_the_api_page_documents_the_public_api():
    api = _text(ROOT / "docs" / "api.md")
    for name in clex.__all__:
        if name == "__version__":
            continue
        obj = getattr(clex, name)
        target = obj.__name__ if isinstance(obj, type(clex)) else f"{obj.__module__}.{obj.__qualname__}"
        assert f"::: {target}\n" in api, f"docs/api.md has no `::: {target}` for clex.{name}"


def test_every_docs_page_is_in_the_nav():
    nav = _text(ROOT / "mkdocs.yml").split("\nnav:\n", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", nav, re.M))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert listed == pages


def test_the_checker_sees_what_it_should():
    """The parsers above find what they are meant to (a checker that finds nothing cannot fail)."""
    text = "```bash\nX=1 bash scripts/setup.sh && clex eval ppl --models a --nope \\\n  --lengths 8\n```\n`clex nope`"
    assert cli_problems(text) == {"clex eval ppl --nope", "clex nope"}
    assert cli_problems("`python -m clex.eval.harness --model clex --model_args x`") == set()
    assert python_names(
        "`clex.max_factor=8`, clex.prior=yarn,clex.mscale=yarn; smollm2-clex.yaml; clex.apply_clex"
    ) == {"clex.apply_clex"}
    assert path_exists("experiments/past-4x/{options,budget}/README.md")
    assert path_exists("recipes/smollm2-RECIPE.yaml") and path_exists("experiments/<q>/README.md")
    assert not path_exists("experiments/past-4x/{options,nowhere}/README.md")


def test_the_docs_and_lint_tools_are_pinned_and_run_by_ci():
    """CI installs the docs and lint extras at the pins of constraints.txt, pre-commit runs the pinned ruff, and CI
    fails on lint and on a docs build with warnings."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", _text(ROOT / "constraints.txt"), re.M))
    pins = {canonicalize_name(name): version for name, version in pins.items()}
    pyproject = _text(ROOT / "pyproject.toml")
    for extra in ("docs", "lint"):
        line = re.search(rf"^{extra} = \[(.*)\]$", pyproject, re.M)
        assert line, f"pyproject.toml has no [{extra}] extra"
        for requirement in re.findall(r'"([^"]+)"', line.group(1)):
            assert canonicalize_name(Requirement(requirement).name) in pins, requirement
    rev = re.search(r"astral-sh/ruff-pre-commit\n\s+rev: v(\S+)", _text(ROOT / ".pre-commit-config.yaml"))
    assert rev and rev.group(1) == pins["ruff"], "the pre-commit ruff and the pinned ruff differ"
    ci = _text(ROOT / ".ci" / "run")
    assert '-e ".[docs,lint]"' in ci and '"docs", "lint"' in ci
    assert "ruff format --check ." in ci and "ruff check ." in ci and "mkdocs build --strict" in ci
    assert '[ "$lint_result" = PASS ] && [ "$docs_result" = PASS ]' in ci
