"""The README stays true: it names every command and method, and CI runs its test command."""

import re
from pathlib import Path

from clex.cli import COMMANDS
from clex.core.config import CLEXConfig
from clex.hf.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_lists_every_cli_command_and_method():
    for command in COMMANDS:
        assert f"`clex {command}" in README, command
    for method in METHODS:
        assert f"`{method}`" in README, method


def test_readme_names_every_config_field():
    for name in CLEXConfig.__dataclass_fields__:
        assert f"`{name}`" in README, name


def test_ci_runs_the_readme_test_command_and_fails_on_no_tests():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert blocks[:2] == ["bash scripts/setup.sh && clex demo", "bash scripts/setup.sh && python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in ci and "\npython -m pytest\n" in ci and '"$rc" -eq 5' in ci
