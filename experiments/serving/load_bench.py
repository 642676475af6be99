"""What per-request t costs under load: the plugin against the pinned export, side by side, on one model.

    python experiments/serving/load_bench.py --vllm-python /work/venvs/vllm/bin/python --requests 32 \
        --min-len 256 --max-len 16384 --rounds 3 --out experiments/serving/results/load_bench.json

The same model is served twice at once on 127.0.0.1, with the same vLLM flags: by ``clex serve`` (every request
at its own t) and, exported with ``clex export --length N`` (N = --max-model-len), by vLLM's own server (every
request at t = N/L). Each round sends the same ``--requests`` requests to one server, all at once: prompts of
lengths drawn log-uniformly in [--min-len, --max-len] from the held-out plays (new draws each round, seeded),
``--max-tokens`` new tokens each (greedy, ignore_eos, streamed). Rounds alternate between the servers
(plugin, export, plugin, export, ...). Per round: throughput (prompt + generated tokens over the round's wall
time), generated tokens/s, and the median time to first token. The ratios plugin / export are taken per pair of
rounds; the JSON keeps every round, and the median, min and max of the ratios. Prefix caching is off on both
(the rounds would otherwise hit each other's cache). The model: SmolLM2-135M with the far recipe's options
(untrained ODE; ``--original-length`` sets CLEX's L, so that short prompts span many t: the cost of a request does
not depend on its t, but a batch of many t exercises the per-request tables as a long-context load would), or
--folder (a CLEX folder).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_check import arguments, free_port, report, stop, vllm_versions, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAR = dict(prior="yarn", log_scale=True, angle_cap=True, past_max="prior", train_t="integer-quadratic", max_factor=16)


def stream(base: str, ids: list[int], max_tokens: int, timeout: float) -> dict:
    """One streamed completion: time to first token and total time (s), tokens generated."""
    body = {"model": "m", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body["stream"] = True
    request = urllib.request.Request(
        f"{base}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    first, chunks = None, 0
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                if first is None:
                    first = time.perf_counter() - t0
                chunks += 1
    return {"ttft_s": first, "total_s": time.perf_counter() - t0, "chunks": chunks}


def one_round(base: str, prompts: list[list[int]], max_tokens: int, timeout: float) -> dict:
    results, errors = [None] * len(prompts), []

    def run(i):
        try:
            results[i] = stream(base, prompts[i], max_tokens, timeout)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")
    tokens = sum(len(p) for p in prompts) + max_tokens * len(prompts)
    return {
        "wall_s": round(wall, 2),
        "tokens_per_s": tokens / wall,
        "generated_per_s": max_tokens * len(prompts) / wall,
        "ttft_median_s": statistics.median(r["ttft_s"] for r in results),
        "ttft_mean_s": statistics.fmean(r["ttft_s"] for r in results),
    }


def main(argv=None) -> int:
    args = arguments(
        __doc__.split("\n\n")[0],
        argv,
        start_timeout=1200.0,
        **{
            "--folder": (str, None, "a CLEX folder (default: SmolLM2 with the far recipe's options, untrained ODE)"),
            "--requests": (int, 32, "concurrent requests per round"),
            "--min-len": (int, 256, "shortest prompt"),
            "--max-len": (int, 16384, "longest prompt"),
            "--max-tokens": (int, 32, "new tokens per request"),
            "--rounds": (int, 3, "rounds per server"),
            "--max-model-len": (int, 32768, "max_model_len of both servers, and the export's N"),
            "--max-num-seqs": (int, 32, "--max-num-seqs of both servers"),
            "--seed": (int, 0, "seed of the prompt draws"),
            "--original-length": (
                int,
                None,
                "CLEX's L for the untrained model (default: SmolLM2's 8192); a small L puts short prompts at many t",
            ),
            "--request-timeout": (float, 7200.0, "seconds for one request"),
        },
    )
    import torch

    import clex
    from clex.data.corpus import split_plays
    from clex.data.smollm2 import convert, load_smollm2

    wall = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="clex-load-"))
    if args.folder:
        folder = Path(args.folder)
        model = clex.load_model(folder)
        tokenizer_from = folder
    else:
        model, tokenizer = load_smollm2(clex=clex.CLEXConfig(**FAR, original_length=args.original_length))
        folder = work / "far"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        tokenizer_from = convert()
    export = clex.export(model, work / "export", length=args.max_model_len, tokenizer_from=tokenizer_from)
    del model
    from transformers import AutoTokenizer

    text = "\n\n".join(split_plays()[1].values())
    ids = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False).input_ids
    rng = random.Random(args.seed)

    def draw() -> list[list[int]]:
        out = []
        for _ in range(args.requests):
            n = round(math.exp(rng.uniform(math.log(args.min_len), math.log(args.max_len))))
            at = rng.randrange(0, len(ids) - n)
            out.append(ids[at : at + n])
        return out

    flags = ["--host", "127.0.0.1", "--dtype", "float32", "--served-model-name", "m", "--enforce-eager"]
    flags += ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs)]
    flags += ["--no-enable-prefix-caching"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ports = {"plugin": free_port(), "export": free_port()}
    commands = {
        "plugin": [sys.executable, "-m", "clex.cli", "serve", "--python", args.vllm_python, str(folder)],
        "export": [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export)],
    }
    servers, result = {}, {"flags": " ".join(flags), "args": vars(args)}
    try:
        for name, command in commands.items():
            log = open(work / f"{name}.log", "w")  # noqa: SIM115 (kept open while the server runs)
            command = command + flags + ["--port", str(ports[name])]
            servers[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            t0 = time.perf_counter()
            wait_ready(f"http://127.0.0.1:{ports[name]}/health", servers[name], args.start_timeout)
            result[f"{name}_start_s"] = round(time.perf_counter() - t0, 1)
            result[f"{name}_command"] = " ".join(command)
        rounds = {"plugin": [], "export": []}
        for r in range(args.rounds):
            prompts = draw()
            for name in ("plugin", "export") if r % 2 == 0 else ("export", "plugin"):
                base = f"http://127.0.0.1:{ports[name]}"
                got = one_round(base, prompts, args.max_tokens, args.request_timeout)
                got["prompt_tokens"] = sum(len(p) for p in prompts)
                rounds[name].append(got)
                print(f"round {r} {name}: {json.dumps(got)}", flush=True)
        result["rounds"] = rounds
        ratios = {}
        for key in ("tokens_per_s", "generated_per_s", "ttft_median_s"):
            values = [a[key] / b[key] for a, b in zip(rounds["plugin"], rounds["export"])]
            ratios[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}
        result["plugin_over_export"] = ratios
    except Exception:
        for name in servers:
            print((work / f"{name}.log").read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        for server in servers.values():
            server.send_signal(signal.SIGTERM)
            stop(server)
    result.update(
        vllm_env=vllm_versions(args.vllm_python),
        torch=torch.__version__,
        wall_s=round(time.perf_counter() - wall, 1),
        cpus=os.cpu_count(),
    )
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
