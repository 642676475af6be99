"""`clex serve` without vLLM: what it hands vLLM (config, generation reserve, environment), what it refuses, and
that SIGTERM stops it and its server cleanly (a stand-in python plays vLLM's, tests/serve/fake_vllm.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_model

import clex
from clex.serve.server import check_python, run, running_in_group, served_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def clex_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clex")
    clex.apply_clex(tiny_model("llama"), exact_cache=False, max_factor=8, log_scale=True).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "eos_token_id": 2}))
    return folder


def write_config(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


QWEN_YARN = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1e6},
}


def test_a_clex_folder_is_served_as_its_per_request_architecture(clex_folder):
    config, generation, scaling = served_config(clex_folder)
    assert config["architectures"] == ["CLEXLlamaForCausalLM"] and "auto_map" not in config
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "clex" and rope["log_scale"] is True and rope["original_length"] == 16
    assert rope["mrope_section"] == [8]  # head_dim 16: the marker vLLM's runner reads
    assert config["max_position_embeddings"] == 16 * 8  # L·max_factor: vLLM's default max_model_len
    assert served_config(clex_folder, max_model_len=100)[0]["max_position_embeddings"] == 100
    assert generation == {"temperature": 0.7, "eos_token_id": 2} and scaling.kind == "clex"
    assert json.loads((clex_folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]  # untouched


def test_the_authors_layout_is_written_in_clexs_own(tmp_path):
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "log_scale": True,
        "rope_scaling": {
            "type": "clex",
            "max_factor": 16,
            "param_factor": 1,
            "act": "silu",
            "time_dt": 0.01,
            "factor": 1,
        },
    }
    config, _, scaling = served_config(write_config(tmp_path / "authors", raw))
    rope = config["rope_parameters"]
    assert "rope_scaling" not in config and "log_scale" not in config
    assert rope["rope_type"] == "clex" and rope["act"] == "silu" and rope["log_scale"] and rope["original_length"] == 32
    assert rope["inference_t"] == "integer" and scaling.t_for(33) == 2.0  # the reference's integer t


def test_stock_yarn_and_dynamic_folders(tmp_path):
    config, _, scaling = served_config(write_config(tmp_path / "yarn", QWEN_YARN))
    assert config["architectures"] == ["CLEXQwen2ForCausalLM"] and scaling.kind == "yarn"
    assert config["max_position_embeddings"] == 64  # vLLM does not multiply YaRN's factor in: L·factor written
    assert config["rope_parameters"]["factor"] == 4.0 and config["rope_parameters"]["mrope_section"] == [8]
    dynamic = {
        **QWEN_YARN,
        "architectures": ["Qwen3ForCausalLM"],
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0},
    }
    config, _, scaling = served_config(write_config(tmp_path / "dynamic", dynamic))
    assert config["architectures"] == ["CLEXQwen3ForCausalLM"] and config["max_position_embeddings"] == 16


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {**QWEN_YARN, "architectures": ["MistralForCausalLM"]},
            r"architectures \['MistralForCausalLM'\] cannot be served",
        ),
        (
            {**QWEN_YARN, "rope_parameters": {"rope_type": "default"}},
            "rope_type 'default' cannot be served per request",
        ),
        ({**QWEN_YARN, "rope_parameters": {"rope_type": "longrope"}}, "rope_type 'longrope' cannot be served"),
    ],
)
def test_what_cannot_be_served_is_refused_in_one_line(tmp_path, raw, message):
    with pytest.raises(ValueError, match=message):
        served_config(write_config(tmp_path / "m", raw))


@pytest.mark.parametrize(
    "argv, kwargs, message",
    [
        (["--port", "1", "--python", "p"], {}, "--python is clex serve's own: put it before MODEL"),
        (["--hf-config-path=x"], {}, "--hf-config-path is set by clex serve"),
        (["--model", "x"], {}, "--model is set by clex serve"),
        ([], {"generation_reserve": 0}, "generation_reserve must be an integer >= 1, got 0"),
    ],
)
def test_bad_command_lines_are_refused(clex_folder, argv, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(str(clex_folder), *argv, **kwargs)


def test_a_python_without_vllm_or_the_plugin_is_named(tmp_path):
    with pytest.raises(ValueError, match="has no vLLM: give --python the python of a venv with vllm"):
        check_python(sys.executable)  # this python has no vLLM
    with pytest.raises(ValueError, match="cannot be run"):
        check_python(str(tmp_path / "missing"))
    python = fake_python(tmp_path)
    os.environ["FAKE_VLLM_VERSION"] = "0.31.2"
    try:
        with pytest.raises(ValueError, match=r"has vLLM 0\.31\.2; clex serve supports vLLM 0\.32\.x"):
            check_python(python)
    finally:
        del os.environ["FAKE_VLLM_VERSION"]


def fake_python(tmp_path: Path) -> str:
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "fake_vllm.py"}" "$@"\n')
    python.chmod(0o755)
    return str(python)


def test_serve_starts_the_server_says_where_it_listens_and_stops_on_sigterm(clex_folder, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "FAKE_VLLM_OUT": str(out), "PYTHONPATH": str(ROOT / "src"), "VLLM_PLUGINS": "other"}
    command = [sys.executable, "-m", "clex.cli", "serve", "--python", fake_python(tmp_path), "--generation-reserve"]
    command += ["77", str(clex_folder), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        lines = []
        while not any("listening on" in line for line in lines):
            line = serve.stdout.readline()
            assert line, f"clex serve ended early: {lines}"
            lines.append(line)
        assert lines[-1].startswith(f"clex serve: {clex_folder} listening on http://127.0.0.1:{port}/v1")
        pid = int(next(line for line in lines if "API server is process" in line).split()[-1])
        argv = json.loads((out / "argv.json").read_text())
        assert argv[:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(clex_folder)]
        assert argv[-6:] == ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
        config = json.loads((out / "hf-config" / "config.json").read_text())
        assert config["architectures"] == ["CLEXLlamaForCausalLM"]
        generation = json.loads((out / "hf-config" / "generation_config.json").read_text())
        assert generation == {"temperature": 0.7, "eos_token_id": 2, "max_new_tokens": 77}
        assert json.loads((out / "env.json").read_text()) == {
            "VLLM_USE_V2_MODEL_RUNNER": "0",
            "VLLM_PLUGINS": "other,clex",
        }
        work = Path(argv[argv.index("--hf-config-path") + 1])
        assert work.is_dir()
        t0 = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0 and time.monotonic() - t0 < 30
        assert "clex serve: stopped" in serve.stdout.read()
        assert (out / "sigterm").is_file() and not work.exists() and running_in_group(pid) == []
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
