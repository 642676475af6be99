"""The public API as a reader meets it: `dir(clex)`, `help(clex)` and type checkers see every name of `clex.__all__`
(loaded lazily, `import clex` stays light), and every public function documents each of its arguments."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import clex
from clex.flags import arg_help

INIT = Path(clex.__file__)


def test_dir_lists_the_public_api_and_nothing_private():
    names = dir(clex)
    assert set(clex.__all__) <= set(names)
    assert "import_module" not in names and "TYPE_CHECKING" not in names and "_LAZY" not in names


def test_type_checkers_see_every_lazy_name():
    """The names imported under `if TYPE_CHECKING:` are exactly the lazy ones, from the same modules."""
    tree = ast.parse(INIT.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {}
    for node in block.body:
        for alias in node.names:
            seen[alias.asname or alias.name] = (node.module, alias.name)
    lazy = {k: v if isinstance(v, tuple) else (v, k) for k, v in clex._LAZY.items()}
    assert seen == {k: (module, name) for k, (module, name) in lazy.items()}


def test_help_of_the_package_documents_the_api():
    """`import clex` loads nothing heavy (tests/test_architecture.py); `help(clex)` loads what it documents."""
    code = "import clex, pydoc; text = pydoc.render_doc(clex, renderer=pydoc.plaintext); print(all(n in text for n in clex.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_every_public_function_documents_each_argument():
    missing = {}
    for name in clex.__all__:
        obj = getattr(clex, name)
        if not inspect.isfunction(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        helps = arg_help(doc)
        params = [p for p in inspect.signature(obj).parameters]
        lacking = [p for p in params if p not in helps]
        if "Args:" not in doc or lacking:
            missing[name] = lacking
    assert not missing, missing


def test_finetune_has_its_own_docstring_and_takes_a_file_dict_or_config():
    from clex.train.loop import run

    assert clex.finetune.__doc__ != run.__doc__ and "clex.finetune(" in clex.finetune.__doc__
    params = inspect.signature(clex.finetune).parameters
    assert list(params) == ["config", "overrides"]
