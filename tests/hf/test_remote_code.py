"""Nothing from a model folder runs, at any entry point: a folder whose tokenizer_config.json (or config.json) points
an ``auto_map`` at a planted .py file is refused in one line naming the file and the entry, with ``y`` on stdin (the
answer transformers' trust_remote_code prompt would take), and the planted file's marker never appears. The
auto_map clex writes into its own saved folders (clex_model.py) keeps loading, without that file running."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import clex
from clex.data.tokenizer import byte_tokenizer

SRC = Path(__file__).resolve().parents[2] / "src"


def plant(folder: Path, marker: Path, *, where: str = "tokenizer") -> Path:
    """A CLEX model folder (the kind that made transformers ask on stdin) with a planted module that writes
    ``marker`` when imported, reached through an auto_map entry."""
    clex.apply_clex(tiny_model("llama", vocab_size=257), max_factor=4).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast\n"
    if where == "tokenizer":
        raw = json.loads((folder / "tokenizer_config.json").read_text())
        raw.pop("tokenizer_class", None)
        raw["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
        (folder / "tokenizer_config.json").write_text(json.dumps(raw))
        (folder / "tokenization_evil.py").write_text(code + "class EvilTokenizer(PreTrainedTokenizerFast): pass\n")
    else:
        raw = json.loads((folder / "config.json").read_text())
        raw["auto_map"] = {**raw["auto_map"], "AutoConfig": "configuration_evil.EvilConfig"}
        (folder / "config.json").write_text(json.dumps(raw))
        (folder / "configuration_evil.py").write_text(code + "from transformers import LlamaConfig as EvilConfig\n")
    return folder


def run_with_yes(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], input="y\ny\ny\n", capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def refused(done: subprocess.CompletedProcess, marker: Path, file: str = "tokenization_evil.py") -> None:
    assert not marker.exists(), "the planted code ran"
    lines = [line for line in done.stderr.splitlines() if line.startswith("clex: error:")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "auto_map entry" in lines[0] and file in lines[0] and "Traceback" not in done.stderr, lines[0]
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "MARKER"
    return plant(tmp_path / "evil", marker), marker


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "ppl", "--lengths", "20"],
        ["eval", "passkey", "--lengths", "300", "--template", "compact", "--samples", "1"],
        ["eval", "needle", "--lengths", "300", "--template", "compact", "--samples", "1"],
        ["eval", "ruler", "--lengths", "600", "--tasks", "niah_single_1", "--samples", "1"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_eval_commands_refuse_a_folder_asking_for_code(evil, tmp_path, command):
    folder, marker = evil
    if command[1] == "ruler":
        pytest.importorskip("lm_eval")
    args = ["-m", "clex.cli", *command, "--models", str(folder), "--out-dir", str(tmp_path / "o")]
    refused(run_with_yes(args, tmp_path), marker)
    assert not (tmp_path / "o").exists()  # nothing written


def test_train_refuses_a_model_folder_asking_for_code(evil, tmp_path):
    folder, marker = evil
    args = ["-m", "clex.cli", "train", f"model={folder}", "steps=1", f"out_dir={tmp_path / 'run'}", "threads=1"]
    refused(run_with_yes(args, tmp_path), marker)


def test_export_refuses_a_model_folder_asking_for_code(evil, tmp_path):
    folder, marker = evil
    refused(
        run_with_yes(["-m", "clex.cli", "export", str(folder), str(tmp_path / "out"), "--length", "64"], tmp_path),
        marker,
    )
    assert not (tmp_path / "out").exists()


def test_plot_freqs_refuses_a_model_folder_asking_for_code(tmp_path):
    marker = tmp_path / "MARKER"
    folder = plant(tmp_path / "evil", marker, where="config")
    args = ["-m", "clex.cli", "plot", "freqs", str(folder), "--out-dir", str(tmp_path / "o")]
    refused(run_with_yes(args, tmp_path), marker, "configuration_evil.py")


def test_load_model_refuses_planted_config_code(tmp_path):
    marker = tmp_path / "MARKER"
    folder = plant(tmp_path / "evil", marker, where="config")
    code = f"import clex; clex.load_model({str(folder)!r})"
    done = run_with_yes(["-c", code], tmp_path)
    assert done.returncode != 0 and not marker.exists()
    assert "configuration_evil.py" in done.stderr and "auto_map entry 'AutoConfig'" in done.stderr


def test_models_smollm2_refuses_a_cached_folder_asking_for_code(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from test_smollm2 import write_tiny_gguf

    from clex.data import smollm2

    gguf = write_tiny_gguf(tmp_path / "Tiny.Q8_0.gguf")
    folder = smollm2.convert(gguf, tmp_path / "cache")
    marker = tmp_path / "MARKER"
    raw = json.loads((folder / "tokenizer_config.json").read_text())
    raw.pop("tokenizer_class", None)
    raw["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(raw))
    (folder / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    args = ["-m", "clex.cli", "models", "smollm2", "--gguf", str(gguf), "--cache-dir", str(tmp_path / "cache")]
    refused(run_with_yes([*args, "--ppl-tokens", "8"], tmp_path), marker)
    code = f"from clex.data.smollm2 import load_smollm2; load_smollm2(gguf={str(gguf)!r}, cache_dir={str(tmp_path / 'cache')!r})"
    done = run_with_yes(["-c", code], tmp_path)
    assert done.returncode != 0 and not marker.exists() and "tokenization_evil.py" in done.stderr


def test_clex_own_folders_still_load_and_their_file_never_runs(tmp_path):
    """clex writes clex_model.py and its auto_map into every saved CLEX folder; load_model reads the folder itself."""
    model = clex.apply_clex(tiny_model("llama", vocab_size=257), max_factor=4)
    model.save_pretrained(tmp_path / "m")
    marker = tmp_path / "MARKER"
    (tmp_path / "m" / "clex_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")  # never imported
    loaded = clex.load_model(tmp_path / "m")
    ids = torch.arange(8)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)
    assert not marker.exists()
