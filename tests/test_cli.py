"""The CLI: every command has --help, bad input is one clear line, and the quick demo runs end to end."""

import json
import subprocess
import sys

import pytest

from clex.cli import COMMANDS, build_parser, main


def test_every_command_is_wired_and_has_help(capsys):
    parser = build_parser()
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*command.split(), "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: clex " + command), command


def test_console_script_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "clex.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("demo", "train", "eval", "plot", "models"):
        assert word in out


def test_bad_input_is_one_line_without_a_traceback(capsys, tmp_path):
    assert main(["eval", "ppl", "--models", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clex: error: ") and "missing" in err and "Traceback" not in err
    assert main(["demo", "--scale", "huge", "--out-dir", str(tmp_path)]) == 2
    assert "scale must be one of quick, default, large, got 'huge'" in capsys.readouterr().err


def test_quick_demo_writes_the_table_plot_json_and_models(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert {r["model"] for r in summary["table"]} == {"base", "clex-1x", "pi-4x", "yarn4-4x"}
    assert all(all(v > 1 for v in r["ppl"].values()) for r in summary["table"])
    assert (out / "demo.png").stat().st_size > 1000 and "| clex-1x |" in (out / "demo.md").read_text()
    assert (out / "models" / "clex-1x" / "final" / "config.json").is_file()
