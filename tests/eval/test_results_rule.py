"""One rule for every command that writes results: nothing is written outside --out-dir (the name is checked before
any work), an earlier result of the same name is refused unless --overwrite, and --overwrite replaces that result's
files and nothing else in the folder."""

import json

import pytest
from test_compare import ppl_file

from clex.cli import main
from clex.data.tokenizer import byte_tokenizer


def cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clex: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def folder(tmp_path):
    from conftest import tiny_model

    path = tmp_path / "base"
    tiny_model("llama", vocab_size=257).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("To be, or not to be, that is the question. " * 4)
    return path


def commands(folder, doc, tmp_path):
    """Each command that writes results, as CLI words (without --out-dir / --name)."""
    (tmp_path / "in").mkdir(exist_ok=True)
    ppl = ppl_file(tmp_path / "in" / "ppl.json", {"a": {8: 10.0, 16: 30.0}, "b": {8: 20.0, 16: 15.0}})
    return {
        "ppl": ["eval", "ppl", "--models", str(folder), "--lengths", "20", "--documents", str(doc)],
        "passkey": ["eval", "passkey", "--models", str(folder), "--lengths", "120", "--template", "compact"]
        + ["--samples", "1", "--depths", "0.5"],
        "needle": ["eval", "needle", "--models", str(folder), "--lengths", "120", "--template", "compact"]
        + ["--samples", "1", "--depths", "0.5", "--documents", str(doc)],
        "compare": ["eval", "compare", "--results", ppl],
    }


@pytest.mark.parametrize("command", ["ppl", "passkey", "needle", "compare"])
def test_an_earlier_result_is_refused_unless_overwrite_which_replaces_only_it(capsys, folder, doc, tmp_path, command):
    words = commands(folder, doc, tmp_path)[command]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file beside the results
    (out / "r.extra.json").write_text("{}")  # another name: not part of the result
    assert main([*words, "--out-dir", str(out), "--name", "r"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"r.json", "r.md", "r.png"} <= set(first)
    err = cli_error(capsys, [*words, "--out-dir", str(out), "--name", "r"])
    assert "r.json exists (an earlier result named 'r'); pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # nothing touched
    assert main([*words, "--out-dir", str(out), "--name", "r", "--overwrite", "--no-plot"]) == 0
    assert not (out / "r.png").exists()  # the replaced result's plot went with it
    assert (out / "notes.txt").read_text() == "mine" and (out / "r.extra.json").read_text() == "{}"
    assert json.loads((out / "r.json").read_text())["written_at"]


@pytest.mark.parametrize("command", ["ppl", "passkey", "needle", "compare"])
@pytest.mark.parametrize("name", ["../X", "a/b", ".hidden", ""])
def test_a_name_outside_the_output_folder_is_refused_before_any_work(capsys, folder, doc, tmp_path, command, name):
    words = commands(folder, doc, tmp_path)[command]
    out = tmp_path / "deep" / "out"
    err = cli_error(capsys, [*words, "--out-dir", str(out), "--name", name])
    assert "name must be a plain file stem" in err and repr(name) in err
    assert not (tmp_path / "deep").exists() and not list(tmp_path.glob("X*"))


def test_ruler_checks_its_name_before_the_partial_file_is_written(capsys, folder, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "d"
    err = cli_error(
        capsys,
        ["eval", "ruler", "--models", str(folder), "--lengths", "600", "--tasks", "niah_single_1", "--samples", "1"]
        + ["--out-dir", str(out), "--name", "../X"],
    )
    assert "name must be a plain file stem" in err
    assert not out.exists() and not list(tmp_path.glob("X*"))


def test_the_lengths_list_takes_commas_as_the_help_says(folder, doc, tmp_path):
    """`--lengths 20,30` (as `clex eval ruler --help` suggests) and `--lengths 20 30` are the same list."""
    base = ["eval", "ppl", "--models", str(folder), "--documents", str(doc), "--no-plot"]
    assert main([*base, "--lengths", "20,30", "--out-dir", str(tmp_path / "a")]) == 0
    assert main([*base, "--lengths", "20", "30", "--out-dir", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "ppl.json").read_text())["config"]["lengths"] for x in "ab")
    assert a == b == [20, 30]
