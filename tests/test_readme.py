"""The README stays a front page: its two set-up commands come first and CI runs the test one; it stays short and
points into docs/ (tests/test_docs.py keeps its paths, commands and names true)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command_and_fails_on_no_tests():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert blocks[:2] == ["bash scripts/setup.sh && clex demo", "bash scripts/setup.sh && python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in ci and "\npython -m pytest\n" in ci and '"$rc" -eq 5' in ci


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 200
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked | {"index.md"}, f"docs pages the README does not link: {sorted(pages - linked)}"
