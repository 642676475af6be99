"""The package's floors, drawn from the code: imports go one way, train and eval are siblings, the core knows
nothing of transformers, and `import clex` loads nothing heavy."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "clex"
#: floor of each subpackage or top-level module (recipes just above the core: train reads it; demo_variants, the
#: demo's table, below the demo; flags, the CLI's reader of the source, beside the demo; cli on top); a module may
#: import only lower floors or its own subpackage; modules of one floor never import each other.
FLOORS = {
    "_version": 0,
    "core": 1,
    "recipes": 2,
    "hf": 2,
    "data": 3,
    "train": 4,
    "eval": 4,
    "serve": 4,
    "demo_variants": 4,
    "demo": 5,
    "flags": 5,
    "cli": 6,
}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(file: Path) -> set[str]:
    """Every clex module that ``file`` imports, at any depth of the code (lazy imports too)."""
    here = "clex." + ".".join(file.relative_to(SRC).with_suffix("").parts)
    package = here if file.name == "__init__.py" else here.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.level and not node.module:  # `from . import recipes`: the submodules named
                out |= {f"{mod}.{a.name}" for a in node.names}
            elif mod == "clex" or mod.startswith("clex."):
                out.add(mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("clex")}
    return out


def graph() -> dict[str, set[str]]:
    result = {}
    for file in SRC.rglob("*.py"):
        name = "clex." + ".".join(file.relative_to(SRC).with_suffix("").parts)
        result[name.removesuffix(".__init__")] = _imports(file)
    return result


def test_imports_go_down_the_floors_only_and_never_into_the_package_init():
    wrong = []
    for module, targets in graph().items():
        if module in ("clex", "clex.train.__main__"):
            continue
        for target in targets:
            if target == "clex":
                wrong.append(f"{module} imports the package's __init__")
                continue
            a, b = _part(module), _part(target)
            if a != b and FLOORS[b] >= FLOORS[a]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the floors:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    g = graph()
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m) :] + [m]))
        if m in done or m not in g:
            return
        stack.append(m)
        for t in g[m]:
            visit(t)
        stack.pop()
        done.add(m)

    for m in g:
        visit(m)


def test_the_core_imports_torch_only():
    for file in (SRC / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{file.name} imports transformers"


def test_import_clex_is_light_and_changes_nothing_in_transformers():
    code = (
        "import sys, clex; heavy = [m for m in ('torch', 'transformers', 'torchdiffeq') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_imports_no_pipeline_nor_torch():
    """`clex --help` and `clex eval --help` read the commands' one-line summaries from the sources (ast)."""
    code = (
        "import sys; from clex import cli; cli.build_parser([]); cli.build_parser(['eval', '--help']); "
        "cli.build_parser(['--help']); "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'clex.train', 'clex.eval', "
        "'clex.demo', 'clex.data', 'transformers'))); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run(
        [sys.executable, "-m", "clex.cli", "eval", "--help"], capture_output=True, text=True, check=True
    )
    assert "Perplexity against length" in out.stdout and "Passkey retrieval" in out.stdout


def test_core_io_is_standard_library_only():
    tree = ast.parse((SRC / "core" / "io.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
