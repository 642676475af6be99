"""The CLI: every command has --help, every flag its own help line, bad input is one clear line (exit code 2),
and the quick demo runs end to end."""

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import tiny_model

from clex.cli import COMMANDS, build_parser, main, summary
from clex.data.tokenizer import byte_tokenizer


def leaf_parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command.split())
    for word in command.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def test_every_command_is_wired_and_has_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            build_parser([*command.split(), "--help"]).parse_args([*command.split(), "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: clex " + command), command


def test_every_flag_has_a_help_line_from_the_docstring():
    import inspect

    from clex.cli import _resolve

    for command in COMMANDS:
        options = [a for a in leaf_parser(command)._actions if a.dest != "help"]
        assert options, command
        empty = [a.dest for a in options if not (a.help or "").strip() or (a.help or "").startswith("(default")]
        assert not empty, f"{command}: flags without a help line in the docstring's Args: {empty}"
        func = _resolve(COMMANDS[command])
        assert summary(command) == inspect.getdoc(func).splitlines()[0]  # the ast-read summary is the docstring's


def test_console_script_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "clex.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for word in ("demo", "train", "eval", "plot", "models", "--debug"):
        assert word in out


def cli_error(capsys, argv) -> str:
    """Run the CLI, expect exit code 2 and exactly one line `clex: error: ...` on stderr (besides progress
    bars); return it."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line and "it/s]" not in line]  # tqdm's bars end with it/s]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("clex: error: ") and "Traceback" not in err, repr(err)
    return lines[0]


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "base"
    tiny_model("llama", vocab_size=257).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("To be, or not to be, that is the question. " * 4)
    return path


def test_models_takes_several_specs(folder, doc, tmp_path):
    out = tmp_path / "o"
    argv = [
        "eval",
        "ppl",
        "--models",
        f"a={folder}",
        f"b={folder}:yarn:factor=4",
        "--lengths",
        "20",
        "40",
        "--documents",
        str(doc),
        "--out-dir",
        str(out),
        "--no-plot",
    ]
    assert main(argv) == 0
    saved = json.loads((out / "ppl.json").read_text())
    assert list(saved["models"]) == ["a", "b"] and saved["config"]["lengths"] == [20, 40]


def test_bad_input_is_one_line_without_a_traceback(capsys, folder, doc, tmp_path):
    assert "--models" in cli_error(capsys, ["eval", "ppl", "--out-dir", str(tmp_path)])
    assert "missing" in cli_error(
        capsys, ["eval", "ppl", "--models", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]
    )
    err = cli_error(capsys, ["demo", "--scale", "huge", "--out-dir", str(tmp_path)])
    assert "'huge'" in err and "quick" in err and "large" in err
    err = cli_error(capsys, ["demo", "--variants", "clex-9x", "--out-dir", str(tmp_path)])
    assert "'clex-9x'" in err and "clex-rec-4x" in err and "pose-pi-1x" in err
    assert "workers must be an integer >= 0" in cli_error(
        capsys, ["demo", "--workers", "-1", "--out-dir", str(tmp_path)]
    )
    ppl = [
        "eval",
        "ppl",
        "--models",
        str(folder),
        "--lengths",
        "20",
        "--documents",
        str(doc),
        "--out-dir",
        str(tmp_path),
    ]
    err = cli_error(capsys, [*ppl, "--dtype", "foo"])
    assert "dtype" in err and "'foo'" in err and "float32, bfloat16, float16" in err
    err = cli_error(capsys, [*ppl, "--device", "foo"])
    assert "device" in err and "'foo'" in err and "cpu, cuda, cuda:N" in err
    assert "chunk must be an integer >= 1 or None (= L" in cli_error(capsys, [*ppl, "--chunk", "0"])
    assert "max_documents must be an integer >= 1" in cli_error(capsys, [*ppl, "--max-documents", "0"])
    assert "samples must be an integer >= 1, got 0" in cli_error(capsys, [*ppl, "--samples", "0"])
    assert "lengths must be integers >= 2" in cli_error(capsys, [*ppl[:-4], "--lengths", "1", *ppl[-4:]])
    assert "invalid int value: 'x'" in cli_error(capsys, [*ppl, "--stride", "x"])
    assert "unknown method 'rerope'" in cli_error(capsys, [*ppl[:3], f"{folder}:rerope:factor=4", *ppl[4:]])
    assert "unknown rope parameter(s) ['beta_fats']" in cli_error(
        capsys, [*ppl[:3], f"{folder}:yarn:factor=4,beta_fats=2", *ppl[4:]]
    )
    assert "maxfactor" in cli_error(capsys, [*ppl[:3], f"{folder}:clex:maxfactor=4", *ppl[4:]])
    passkey = ["eval", "passkey", "--models", str(folder), "--lengths", "300", "--out-dir", str(tmp_path)]
    assert "depths must be finite fractions in [0, 1]" in cli_error(capsys, [*passkey, "--depths", "nan"])
    assert "trials must be an integer >= 1, got 0" in cli_error(capsys, [*passkey, "--trials", "0"])


def test_corrupt_files_are_named(capsys, folder, doc, tmp_path):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02 binary \x00")
    ppl = ["eval", "ppl", "--models", str(folder), "--lengths", "20", "--out-dir", str(tmp_path)]
    assert "bin.txt" in cli_error(capsys, [*ppl, "--documents", str(binary)])
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "model.safetensors" in cli_error(capsys, [*ppl, "--documents", str(doc)])


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "eval", "ppl", "--models", str(tmp_path / "missing"), "--out-dir", str(tmp_path)])
    monkeypatch.setenv("CLEX_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["eval", "ppl", "--models", str(tmp_path / "missing"), "--out-dir", str(tmp_path)])


def test_quick_demo_writes_the_tables_plots_json_and_models(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--scale", "quick", "--out-dir", str(out)]) == 0  # two fine-tunes at once (processes)
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    names = {"base", "clex-rec-4x", "clex-far-4x", "yarn8-4x", "pi-4x"}
    assert {r["model"] for r in summary["table"]} == names and summary["seed"] == 0
    assert all(all(v > 1 for v in r["ppl"].values()) for r in summary["table"])
    for n in ("32", "64", "128"):  # the ratio to the best model at each length: 1 for the best one
        assert min(r["ratio"][n] for r in summary["table"]) == 1.0
        assert all(r["ratio"][n] >= 1 and r["worst"] >= r["ratio"][n] for r in summary["table"])
    assert set(summary["seconds"]) == set(summary["cpu_seconds"]) == names - {"base"} | {"pretrain", "evaluation"}
    for name in ("demo.png", "ppl.png", "ratio.png"):
        assert (out / name).stat().st_size > 1000, name
    md = (out / "demo.md").read_text()
    assert "| clex-far-4x | 4 x L |" in md and "| worst |" in md and md in printed
    assert (out / "models" / "clex-far-4x" / "final" / "config.json").is_file()
    assert "clex train:" in (out / "models" / "clex-far-4x" / "train.log").read_text()  # a worker's own output
    # a rerun reuses every stage; a stage trained under another definition of its variant is refused, not reused
    import clex.demo as demo

    assert main(["demo", "--scale", "quick", "--out-dir", str(out), "--workers", "1"]) == 0
    assert capsys.readouterr().out.count("already trained") == 5  # the base and the four variants
    monkeypatch.setitem(demo.VARIANTS, "clex-rec-4x", demo.VARIANTS["clex-rec-gaps-4x"])
    assert (
        "clex-rec-4x holds a clex-rec-4x (recommended, rows of 4 x L) trained with other settings (pose differ)"
        in cli_error(capsys, ["demo", "--scale", "quick", "--out-dir", str(out)])
    )
    # --overwrite removes what the demo made, and nothing else
    (out / "mine.txt").write_text("a user's file")
    monkeypatch.setitem(demo.SCALES, "quick", dataclasses.replace(demo.SCALES["quick"], variants=("pi-4x",)))
    assert main(["demo", "--scale", "quick", "--out-dir", str(out), "--overwrite", "--workers", "1"]) == 0
    assert (out / "mine.txt").read_text() == "a user's file" and not (out / "models" / "clex-far-4x").exists()
