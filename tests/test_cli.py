"""The CLI: every command has --help, every flag its own help line, bad input is one clear line (exit code 2),
and the quick demo runs end to end."""

import argparse
import dataclasses
import importlib
import inspect
import json
import subprocess
import sys

import pytest
from conftest import tiny_model

import clex
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


def resolve(command: str):
    module, _, name = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(f"clex.{module}"), name)


def test_every_flag_has_a_help_line_from_the_docstring():
    for command in COMMANDS:
        options = [a for a in leaf_parser(command)._actions if a.dest != "help"]
        assert options, command
        empty = [a.dest for a in options if not (a.help or "").strip() or (a.help or "").startswith("(default")]
        assert not empty, f"{command}: flags without a help line in the docstring's Args: {empty}"
        func = resolve(command)
        assert summary(command) == inspect.getdoc(func).splitlines()[0]  # the ast-read summary is the docstring's
        # the flags read from the source are the function's parameters, each with its real default
        signature = inspect.signature(func).parameters
        dests = {a.dest for a in options}
        assert dests == set(signature), (command, dests ^ set(signature))
        for action in options:
            default = signature[action.dest].default
            if action.default is not argparse.SUPPRESS and default is not inspect.Parameter.empty:
                expected = list(default) if isinstance(default, tuple) and action.nargs == "+" else default
                shown = list(action.default) if isinstance(action.default, tuple) else action.default
                assert shown == expected, (command, action.dest, action.default, default)


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
    assert "samples must be an integer >= 1, got 0" in cli_error(capsys, [*passkey, "--samples", "0"])


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


def test_a_wrong_choice_is_refused_before_torch_is_imported():
    """The choices are read from the sources (Literal annotations, ast): a typo costs a fraction of a second."""
    code = (
        "import sys, time; from clex.cli import main\n"
        "for argv in (['eval', 'ppl', '--models', 'm', '--protocol', 'slidng'], ['export', 'a', 'b', '--length', '9',"
        " '--format', 'ggfu'], ['eval', 'ruler', '--models', 'm', '--tasks', 'niah_single_1,ruler_vtt'],"
        " ['eval', 'passkey', '--models', 'm', '--template', 'compakt'], ['eval', 'ppl', '--models', 'm', '--dtype', 'f16']):\n"
        "    try: main(argv)\n"
        "    except SystemExit as e: assert e.code == 2\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy\n"
        "print(time.process_time())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    errors = done.stderr.splitlines()
    assert len(errors) == 5 and all(e.startswith("clex: error: argument --") for e in errors), errors
    assert "'slidng' is not one of sliding, chunked (did you mean 'sliding'?)" in errors[0]
    assert "'ggfu' is not one of hf, gguf (did you mean 'gguf'?)" in errors[1]
    assert "'ruler_vtt' is not one of" in errors[2] and "did you mean 'ruler_vt'" in errors[2]
    assert float(done.stdout) < 1.0  # CPU seconds for all five, imports included


def test_every_literal_annotation_becomes_choices_and_matches_its_registry():
    import typing

    from clex.demo_variants import SCALES, VARIANTS
    from clex.eval.perplexity import PROTOCOLS
    from clex.eval.retrieval import TEMPLATES
    from clex.eval.ruler_tasks import SKIPPED, TASKS, RulerTask
    from clex.hf.export import FORMATS

    assert list(typing.get_args(RulerTask)) == [*TASKS, *SKIPPED]
    assert {t for _, t in TEMPLATES} == set(typing.get_args(typing.get_type_hints(clex.run_passkey)["template"]))
    expected = {
        "eval ppl": {"protocol": list(PROTOCOLS), "dtype": ["float32", "bfloat16", "float16"]},
        "eval ruler": {"tasks": list(typing.get_args(RulerTask))},
        "export": {"format": list(FORMATS)},
        "demo": {"scale": list(SCALES), "variants": list(VARIANTS)},
    }
    for command in COMMANDS:
        func = resolve(command)
        hints = typing.get_type_hints(func)
        for action in leaf_parser(command)._actions:
            hint = hints.get(action.dest)
            literal = [a for a in _literals(hint)]
            if literal:  # the help shows them, the parser checks them
                assert action.metavar and (
                    set(map(str, literal)) <= set(action.metavar.strip("{}").split(",")) or "choices" in action.help
                ), (command, action.dest)
            if action.dest in expected.get(command, {}):
                assert literal == expected[command][action.dest], (command, action.dest, literal)


def _literals(hint) -> list:
    import typing

    if hint is None:
        return []
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return [v for a in typing.get_args(hint) for v in _literals(a)]


def test_train_takes_config_and_key_value_words_and_suggests_the_closest_field(capsys, tmp_path):
    err = cli_error(capsys, ["train", "recipes/tiny-clex.yaml", "clex.maxfactor=8"])
    assert err == "clex: error: TrainConfig.clex has no field 'maxfactor' (did you mean 'max_factor'?)"
    err = cli_error(capsys, ["train", "recipes/tiny-clex.yaml", "stepz=8"])
    assert err == "clex: error: TrainConfig has no field 'stepz' (did you mean 'steps'?)"
    err = cli_error(capsys, ["train", "recipes/tiny-clex.yaml", "method=yran"])
    assert "did you mean 'yarn'?" in err
    assert "did you mean recipes/tiny-clex.yaml?" in cli_error(capsys, ["train", "recipes/tiny-clx.yaml"])
    for old, new in (("--config", "first word"), ("--override", "KEY=VALUE")):
        assert new in cli_error(capsys, ["train", old, "recipes/tiny-clex.yaml"])


def test_train_help_gives_every_field_its_default_and_meaning(capsys):
    import dataclasses

    from clex.flags import dataclass_fields
    from clex.train.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: clex train [CONFIG] [KEY=VALUE ...]")
    rows = dataclass_fields("train.config", "TrainConfig")
    assert [r[1] for r in rows] == [f.name for f in dataclasses.fields(TrainConfig)]
    assert all(meaning for *_, meaning in rows), [r[1] for r in rows if not r[3]]
    for _, name, default, meaning in rows:
        assert f"{name} = {default}" in text and meaning[:40] in " ".join(text.split()), name
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    assert all(repr(v) == d for (_, n, d, _) in rows if n in defaults for v in [defaults[n]]), rows


def test_old_flags_name_their_new_words(capsys, tmp_path):
    assert "(--trials is now --samples)" in cli_error(capsys, ["eval", "passkey", "--models", "m", "--trials", "2"])
    assert "(--fresh is now --overwrite)" in cli_error(capsys, ["demo", "--fresh"])
    assert "(--quick is now --scale quick)" in cli_error(capsys, ["demo", "--quick"])
    assert "(--force is now --overwrite)" in cli_error(capsys, ["models", "smollm2", "--force"])
    assert "(--out is now --out-dir and --name)" in cli_error(capsys, ["plot", "freqs", "m", "--out", "f.png"])
    assert "did you mean --samples?" in cli_error(capsys, ["eval", "passkey", "--models", "m", "--sampels", "2"])
