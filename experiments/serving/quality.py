"""Perplexity through the server: per-request t against the pinned export and clex's own numbers, by length.

    python experiments/serving/quality.py --vllm-python /work/venvs/vllm/bin/python --lengths 2048,8192,16384 \
        --windows 2,2,1 --folder FOLDER --pinned-length 131072 --out experiments/serving/per-request/quality.json

Held-out plays (clex's embedded corpus), SmolLM2-135M-Instruct (L = 8,192). For each length n, the first n tokens of
the first ``--windows`` plays (one count, or one per length) that are at least n tokens long (the windows of ``clex eval ppl --protocol chunked``
with one sample per play). Each window is one request: its first n-1 tokens as the prompt, ``max_tokens`` 1 (so the
request's final length is n, the t of ``clex eval`` at n), ``prompt_logprobs`` 1, float32; perplexity over the
n-2 tokens the prompt scores. Served, one server at a time, with the same vLLM flags:

- ``per_request``: ``clex serve`` on the CLEX model (the far recipe's options; ``--folder`` for a trained one, else
  an untrained ODE);
- ``pinned``: ``clex export --length N`` of the same model (N = ``--pinned-length``, default the longest length),
  stock vLLM with the same ``--max-model-len`` (t = N/L for all);
- with ``--yarn-factor F``: SmolLM2 with YaRN factor F (no training), ``yarn_per_request`` by ``clex serve`` and
  ``yarn_static`` by stock vLLM, for n <= F·L.

And in this python (transformers, no server): ``clex`` — the CLEX model at its own t, chunked with the key cache
carried and t pinned at n (``clex.eval.perplexity.nll_chunked``, what ``clex eval ppl`` computes), scored on the
same n-2 tokens; ``unscaled`` — SmolLM2 without CLEX, for n <= L. Writes JSON (every window's perplexity, times,
versions) and a Markdown table beside it.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_check import arguments, free_port, post, report, stop, vllm_versions, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAR = dict(prior="yarn", log_scale=True, angle_cap=True, past_max="prior", train_t="integer-quadratic", max_factor=16)


def windows(tokenizer, lengths: list[int], counts: list[int]) -> dict[int, dict[str, list[int]]]:
    from clex.data.corpus import split_plays

    docs = {name: tokenizer(text, add_special_tokens=False).input_ids for name, text in split_plays()[1].items()}
    out = {}
    for n, count in zip(lengths, counts):
        long_enough = [(name, ids[:n]) for name, ids in docs.items() if len(ids) >= n]
        out[n] = dict(long_enough[:count])
    return out


def served_nll(base: str, ids: list[int], timeout: float) -> list[float]:
    prompt = ids[:-1]
    reply = post(
        f"{base}/v1/completions",
        {"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1},
        timeout=timeout,
    )
    rows = reply["choices"][0]["prompt_logprobs"]
    return [-row[str(i)]["logprob"] for row, i in zip(rows[1:], prompt[1:])]


def serve(name: str, command: list[str], wins: dict, args, env: dict, work: Path) -> dict:
    """Start one server, send every window (one at a time), stop it: {n: {doc: nll list}} and times."""
    port = free_port()
    flags = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--served-model-name", "m"]
    flags += ["--max-model-len", str(max(wins)), "--max-num-seqs", "1", "--enforce-eager"]
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 (open while the server runs)
    t0 = time.perf_counter()
    server = subprocess.Popen(command + flags, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    out = {"command": " ".join(command + flags), "nll": {}, "request_s": {}}
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", server, args.start_timeout)
        out["start_s"] = round(time.perf_counter() - t0, 1)
        for n, docs in wins.items():
            out["nll"][n], out["request_s"][n] = {}, {}
            for doc, ids in docs.items():
                t0 = time.perf_counter()
                out["nll"][n][doc] = served_nll(f"http://127.0.0.1:{port}", ids, args.request_timeout)
                out["request_s"][n][doc] = round(time.perf_counter() - t0, 1)
                print(f"{name} {n} {doc}: ppl {math.exp(sum(out['nll'][n][doc]) / (n - 2)):.4f}", flush=True)
    except Exception:
        print((work / f"{name}.log").read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        server.send_signal(signal.SIGTERM)
        stop(server)
        log.close()
    return out


def local_nll(model, wins: dict, L: int) -> dict:
    """clex's own per-token NLL (chunked by L, t pinned at n), first n-2 tokens of each window."""
    import torch

    from clex.eval.perplexity import nll_chunked

    out = {}
    for n, docs in wins.items():
        out[n] = {}
        for doc, ids in docs.items():
            out[n][doc] = nll_chunked(model, torch.tensor(ids), chunk=L)[: n - 2].tolist()
            print(f"local {n} {doc}: ppl {math.exp(sum(out[n][doc]) / (n - 2)):.4f}", flush=True)
    return out


def summarise(nll: dict) -> dict:
    """{n: {"ppl": over every scored token of the windows, "per_window": {doc: ppl}}}."""
    out = {}
    for n, docs in nll.items():
        flat = [v for values in docs.values() for v in values]
        out[n] = {
            "ppl": math.exp(sum(flat) / len(flat)),
            "per_window": {doc: math.exp(sum(v) / len(v)) for doc, v in docs.items()},
        }
    return out


def main(argv=None) -> int:
    args = arguments(
        __doc__.split("\n\n")[0],
        argv,
        start_timeout=1200.0,
        **{
            "--lengths": (lambda s: [int(x) for x in s.split(",")], [2048, 8192, 16384], "lengths, comma-separated"),
            "--windows": (
                lambda s: [int(x) for x in s.split(",")],
                [2],
                "windows (plays) per length, or one per length",
            ),
            "--pinned-length": (int, None, "N of the pinned export (default: the longest length)"),
            "--folder": (str, None, "a trained CLEX folder (default: SmolLM2 + the far recipe's options, untrained)"),
            "--yarn-factor": (float, 0.0, "also measure SmolLM2 + YaRN of this factor (0: no)"),
            "--parts": (str, "per_request,pinned,clex,unscaled,yarn", "what to measure, comma-separated"),
            "--request-timeout": (float, 7200.0, "seconds for one request"),
        },
    )
    import torch
    import transformers

    import clex
    from clex.data.smollm2 import convert, load_smollm2

    wall = time.perf_counter()
    parts = set(args.parts.split(","))
    work = Path(tempfile.mkdtemp(prefix="clex-quality-"))
    if args.folder:
        folder = Path(args.folder)
        model = clex.load_model(folder, dtype="float32").eval()
        about = args.folder
    else:
        model, tokenizer = load_smollm2(clex=clex.CLEXConfig(**FAR))
        folder = work / "far"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        about = "SmolLM2-135M-Instruct + CLEX, the far recipe's options, untrained ODE"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(convert())
    L = clex.get_clex_rotary(model).original_length
    lengths = sorted(args.lengths)
    counts = args.windows * len(lengths) if len(args.windows) == 1 else args.windows
    if len(counts) != len(lengths):
        raise ValueError(f"--windows must be one count or one per length ({len(lengths)}), got {args.windows}")
    wins = windows(tokenizer, lengths, counts)
    N = args.pinned_length or lengths[-1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    stock = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    per_request = [sys.executable, "-m", "clex.cli", "serve", "--python", args.vllm_python]
    result = {
        "model": about,
        "L": L,
        "lengths": lengths,
        "windows": {n: list(d) for n, d in wins.items()},
        "pinned_N": N,
        "runs": {},
    }
    nll = {}
    if "pinned" in parts:  # first: a refused export should not wait for the rest
        export = clex.export(model, work / "export", length=N, tokenizer_from=convert())
    if "clex" in parts:
        t0 = time.perf_counter()
        nll["clex"] = local_nll(model, wins, L)
        result["runs"]["clex"] = {"s": round(time.perf_counter() - t0, 1)}
    del model
    if "per_request" in parts:
        run = serve("per_request", per_request + [str(folder)], wins, args, env, work)
        nll["per_request"] = run.pop("nll")
        result["runs"]["per_request"] = run
    if "pinned" in parts:
        run = serve("pinned", stock + [str(export)], wins, args, env, work)
        nll["pinned"] = run.pop("nll")
        result["runs"]["pinned"] = run
    short = {n: d for n, d in wins.items() if n <= L}
    if "unscaled" in parts and short:
        plain, _ = load_smollm2()
        t0 = time.perf_counter()
        nll["unscaled"] = local_nll(plain, short, L)
        result["runs"]["unscaled"] = {"s": round(time.perf_counter() - t0, 1)}
        del plain
    if "yarn" in parts and args.yarn_factor > 1:
        plain, _ = load_smollm2()
        plain.config.rope_parameters = {
            "rope_type": "yarn",
            "factor": args.yarn_factor,
            "original_max_position_embeddings": L,
            "rope_theta": plain.config.rope_parameters["rope_theta"],
        }
        plain.config.max_position_embeddings = int(L * args.yarn_factor)  # vLLM does not multiply YaRN's factor in
        plain.save_pretrained(work / "yarn")
        tokenizer.save_pretrained(work / "yarn")
        del plain
        within = {n: d for n, d in wins.items() if n <= L * args.yarn_factor}
        for name, command in (("yarn_per_request", per_request), ("yarn_static", stock)):
            run = serve(name, command + [str(work / "yarn")], within, args, env, work)
            nll[name] = run.pop("nll")
            result["runs"][name] = run
        result["yarn_factor"] = args.yarn_factor
    result["ppl"] = {name: summarise(values) for name, values in nll.items()}
    if "clex" in nll:  # every scored token against clex's own: max |difference| of its NLL
        result["max_abs_nll_vs_clex"] = {
            name: {
                n: max(abs(a - b) for doc in docs for a, b in zip(docs[doc], nll["clex"][n][doc]))
                for n, docs in values.items()
                if n in nll["clex"]
            }
            for name, values in nll.items()
            if name != "clex"
        }
    result.update(
        vllm_env=vllm_versions(args.vllm_python),
        clex_env={"torch": torch.__version__, "transformers": transformers.__version__},
        wall_s=round(time.perf_counter() - wall, 1),
        cpus=os.cpu_count(),
    )
    report(result, args.out)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(table(result) + "\n")
    return 0


def table(result: dict) -> str:
    names = [
        k
        for k in ("per_request", "clex", "pinned", "unscaled", "yarn_per_request", "yarn_static")
        if k in result["ppl"]
    ]
    lines = ["| length | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for n in result["lengths"]:
        cells = []
        for name in names:
            row = result["ppl"][name].get(n) or result["ppl"][name].get(str(n))
            cells.append(f"{row['ppl']:.3f}" if row else "—")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
