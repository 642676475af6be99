"""Issue 17 on one GPU: which part of CLEX breaks past 4x on SmolLM2-135M, and which option mends it.

Two stages, each spreading its jobs over several processes on the one GPU (a 135M model at 8k rows leaves
most of an H200 idle, so N runs side by side cost about what one does):

    python experiments/run.py train --base BASE --work W --parallel 8 --steps 200 \
        --runs clex=clex yarn8=yarn cap=clex:clex.angle_cap=true yarn16=yarn:factor=16 ...
    python experiments/run.py eval --base BASE --work W --out experiments/past-4x/options --parallel 4 \
        --docs plays=PATH kjv=PATH --lengths 8192,16384,32768,65536,131072 \
        --models base=base clex=clex clex-zero-ode=clex:ode=zero prior=base:clex=1 ...

--runs NAME=RECIPE[:KEY=VALUE,...]: recipes/smollm2-RECIPE.yaml with the same budget for every run (steps x
batch x seq_len) plus these TrainConfig overrides (``steps=1000`` gives one run a larger budget; ``save_every=100``
checkpoints it); trained into W/NAME (skipped if W/NAME/final exists; an interrupted run resumes from its latest
checkpoint, or starts again if it left none).
--models NAME=SOURCE[:KEY=VALUE,...], SOURCE a trained run's name or ``base``. Keys: CLEXConfig fields
(changed at load time, e.g. angle_cap=true), ``clex=1`` (apply CLEX fresh: the untrained prior),
``yarn=S`` (transformers' YaRN factor S, untrained), ``ode=zero`` (the ODE weights zeroed: the run's LoRA
with the prior θ(t)), ``ode_from=RUN`` (the base model with RUN's ODE weights: the learned θ(t) alone).

Every evaluation: chunked perplexity (= one full forward, CLEX's t pinned to the window length) on
``samples`` windows per length of each document, the mean NLL of each of ``buckets`` position buckets, and at
the 8x length the content-controlled ratio: the last L tokens of the window scored with the whole window as
context against the same tokens scored with only the L tokens before them (ppl ratio; <= 1: more context
did not hurt). Results: OUT/eval_<model>.json, OUT/past4x.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

RECIPE_BUDGET = ("seq_len", "batch_size", "steps")


def _parallel(jobs: list[list[str]], parallel: int, logs: Path) -> None:
    """Run each argv in ``jobs`` as a subprocess, ``parallel`` at a time; fail loudly if any fails."""
    logs.mkdir(parents=True, exist_ok=True)
    running, failed, queue = [], [], list(enumerate(jobs))
    while queue or running:
        while queue and len(running) < parallel:
            i, argv = queue.pop(0)
            log = open(logs / f"job{i:02d}.log", "w")
            running.append((i, argv, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in list(running):
            i, argv, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                print(f"   job {i} rc={proc.returncode}: {' '.join(argv[-3:])}", flush=True)
                if proc.returncode:
                    failed.append(i)
                    print((logs / f"job{i:02d}.log").read_text()[-3000:], flush=True)
    if failed:
        raise SystemExit(f"jobs {failed} failed (logs in {logs})")


# --- training -------------------------------------------------------------------------------------------------


def train_one(a) -> None:
    from clex.train.config import TrainConfig
    from clex.train.loop import run

    name, _, rest = a.run.partition("=")
    recipe, _, extra = rest.partition(":")
    cfg = TrainConfig.from_file(
        f"recipes/smollm2-{recipe}.yaml",
        [
            f"model={a.base}",
            f"out_dir={Path(a.work) / name}",
            f"seq_len={a.seq_len}",
            f"batch_size={a.batch}",
            f"steps={a.steps}",
            "dtype=bfloat16",
            "gradient_checkpointing=true",
            "save_every=0",
            "eval_every=0",
            "log_every=10",
            "threads=2",
            *filter(None, extra.split(",")),
        ],
    )
    start = time.perf_counter()
    run(cfg)
    (Path(a.work) / name / "wall.json").write_text(json.dumps({"train_s": round(time.perf_counter() - start, 1)}))


def _restart(run: str, folder: Path) -> str:
    """``run`` with what an interrupted earlier attempt in ``folder`` needs: ``resume=true`` when it left a
    checkpoint (the run continues bit-identically), ``overwrite=true`` when it left none (it starts again)."""
    if not folder.exists():
        return run
    from clex.train.checkpoints import latest_checkpoint

    key = "resume=true" if latest_checkpoint(folder) is not None else "overwrite=true"
    name_recipe, sep, extra = run.partition(":")
    return f"{name_recipe}:{extra + ',' if sep and extra else ''}{key}"


def train(a) -> None:
    jobs = []
    for run in a.runs:
        name = run.partition("=")[0]
        if (Path(a.work) / name / "final" / "config.json").is_file():
            continue
        run = _restart(run, Path(a.work) / name)
        jobs.append(
            [
                sys.executable,
                __file__,
                "train-one",
                "--base",
                a.base,
                "--work",
                a.work,
                "--steps",
                str(a.steps),
                "--batch",
                str(a.batch),
                "--seq-len",
                str(a.seq_len),
                "--run",
                run,
            ]
        )
    start = time.perf_counter()
    _parallel(jobs, a.parallel, Path(a.work) / "logs-train")
    print(f"== trained {len(jobs)} runs in {time.perf_counter() - start:.0f} s", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in a.runs:
        name = run.partition("=")[0]
        log = Path(a.work) / name / "log.jsonl"
        if log.is_file():
            (out / f"log_{name}.jsonl").write_text(log.read_text())


# --- evaluation -------------------------------------------------------------------------------------------


def _load(a, spec: str):
    import torch
    from transformers import AutoTokenizer

    import clex
    from clex.eval.specs import parse_params
    from clex.hf.methods import prepare_model

    name, _, rest = spec.partition("=")
    source, _, params = rest.partition(":")
    params = parse_params(params, f"--models {spec!r}")
    folder = Path(a.base) if source == "base" else Path(a.work) / source / "final"
    ode, ode_from = params.pop("ode", None), params.pop("ode_from", None)
    fresh, yarn = params.pop("clex", None), params.pop("yarn", None)
    kw = dict(dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    if fresh or ode_from:
        model = clex.load_model(folder, clex=clex.CLEXConfig(**{"max_factor": 8, **params}), **kw)
    else:
        model = clex.load_model(folder, **params, **kw)
    if yarn:
        prepare_model(model, "yarn", factor=float(yarn))
    if ode_from:
        src = clex.get_clex_rotary(clex.load_model(Path(a.work) / ode_from / "final"))
        clex.get_clex_rotary(model).dynamics.load_state_dict(src.dynamics.state_dict())
    if ode == "zero":
        with torch.no_grad():
            clex.get_clex_rotary(model).dynamics.ode_down_proj.zero_()
    return name, model.eval(), AutoTokenizer.from_pretrained(folder)


def eval_one(a) -> None:
    import torch

    from clex.eval.perplexity import nll_chunked

    name, model, tok = _load(a, a.model)
    lengths = [int(x) for x in a.lengths.split(",")]
    L = 8192
    result = {"model": a.model, "docs": {}}
    start = time.perf_counter()
    for doc in a.docs:
        label, _, path = doc.partition("=")
        ids = torch.tensor(tok(Path(path).read_text(), add_special_tokens=False)["input_ids"])
        rows = {}
        for n in lengths:
            if n + 1 > ids.numel():
                continue
            starts = [round(k * (ids.numel() - n - 1) / max(a.samples - 1, 1)) for k in range(a.samples)]
            nlls, buckets, ratio = [], [], []
            for s in starts:
                window = ids[s : s + n]
                with torch.no_grad():
                    nll = nll_chunked(model, window, chunk=n).double()  # [n-1]
                nlls.append(float(nll.mean()))
                buckets.append([float(b.mean()) for b in nll.chunk(a.buckets)])
                if n == 8 * L:  # content-controlled: the last L tokens with the whole window vs with L before them
                    with torch.no_grad():
                        short = nll_chunked(model, window[-2 * L :], chunk=2 * L).double()
                    ratio.append(math.exp(float(nll[-L:].mean()) - float(short[-L:].mean())))
            mean = sum(nlls) / len(nlls)
            rows[str(n)] = {
                "ppl": math.exp(mean),
                "ppl_windows": [math.exp(x) for x in nlls],
                "bucket_ppl": [math.exp(sum(b[i] for b in buckets) / len(buckets)) for i in range(a.buckets)],
                **({"context_ratio": sum(ratio) / len(ratio), "context_ratio_windows": ratio} if ratio else {}),
            }
        result["docs"][label] = rows
    result["eval_s"] = round(time.perf_counter() - start, 1)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"eval_{name}.json").write_text(json.dumps(result, indent=1) + "\n")


def evaluate(a) -> None:
    jobs = []
    for spec in a.models:
        name = spec.partition("=")[0]
        if (Path(a.out) / f"eval_{name}.json").is_file():
            continue
        jobs.append(
            [
                sys.executable,
                __file__,
                "eval-one",
                "--base",
                a.base,
                "--work",
                a.work,
                "--out",
                a.out,
                "--lengths",
                a.lengths,
                "--samples",
                str(a.samples),
                "--buckets",
                str(a.buckets),
                "--docs",
                *a.docs,
                "--model",
                spec,
            ]
        )
    start = time.perf_counter()
    _parallel(jobs, a.parallel, Path(a.work) / "logs-eval")
    print(f"== evaluated {len(jobs)} models in {time.perf_counter() - start:.0f} s", flush=True)
    summarize(a)


def summarize(a) -> None:
    out = Path(a.out)
    results = {p.stem.removeprefix("eval_"): json.loads(p.read_text()) for p in sorted(out.glob("eval_*.json"))}
    (out / "past4x.json").write_text(json.dumps(results, indent=1) + "\n")
    lengths = [int(x) for x in a.lengths.split(",")]
    docs = sorted({d for r in results.values() for d in r["docs"]})
    lines = []
    for doc in docs:
        lines += [
            f"### {doc}",
            "",
            "| model | " + " | ".join(f"{n // 1024}k" for n in lengths) + " | 64k last/prev bucket | ctx ratio 64k |",
            "|---|" + "---|" * (len(lengths) + 2),
        ]
        for name, r in results.items():
            rows = r["docs"].get(doc, {})
            cells = [f"{rows[str(n)]['ppl']:.1f}" if str(n) in rows else "–" for n in lengths]
            b = rows.get("65536", {}).get("bucket_ppl")
            jump = f"{b[-1] / b[-2]:.2f}" if b else "–"
            ratio = rows.get("65536", {}).get("context_ratio")
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {jump} | " + (f"{ratio:.3f}" if ratio else "–") + " |"
            )
        lines.append("")
    (out / "past4x.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(docs), figsize=(6 * len(docs), 4.5), squeeze=False)
        for ax, doc in zip(axes[0], docs):
            for name, r in results.items():
                rows = r["docs"].get(doc, {})
                xs = [n for n in lengths if str(n) in rows]
                ax.plot(xs, [rows[str(n)]["ppl"] for n in xs], marker="o", label=name)
            ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="perplexity", title=doc)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "past4x.png", dpi=110)
    except ImportError:
        pass


def seeds(a) -> None:
    """Mean (min-max) over the runs of each group: --groups NAME=EVAL_JSON,EVAL_JSON,... -> OUT/seeds.{json,md}."""
    lengths = [int(x) for x in a.lengths.split(",")]
    files = {name: paths.split(",") for name, _, paths in (item.partition("=") for item in a.groups)}
    groups = {name: [json.loads(Path(f).read_text()) for f in paths] for name, paths in files.items()}
    docs = sorted({d for runs in groups.values() for r in runs for d in r["docs"]})
    table, lines = {}, []
    for doc in docs:
        lines += [
            f"### {doc} (mean over runs; min-max where it exceeds 0.1, for the ratio 0.01)",
            "",
            "| group | runs | " + " | ".join(f"{n // 1024}k" for n in lengths) + " | ctx ratio 64k |",
            "|---|---|" + "---|" * (len(lengths) + 1),
        ]
        for name, runs in groups.items():
            cells, stats = [], {}
            for n in [*lengths, "ctx"]:
                key, field = ("65536", "context_ratio") if n == "ctx" else (str(n), "ppl")
                vals = [r["docs"][doc][key][field] for r in runs if field in r["docs"].get(doc, {}).get(key, {})]
                if not vals:
                    cells.append("–")
                    continue
                mean, lo, hi = sum(vals) / len(vals), min(vals), max(vals)
                stats[str(n)] = {"mean": mean, "min": lo, "max": hi, "runs": len(vals)}
                digits = 3 if n == "ctx" else 1
                spread = f" ({lo:.{digits}f}–{hi:.{digits}f})" if hi - lo > (0.01 if n == "ctx" else 0.1) else ""
                cells.append(f"{mean:.{digits}f}{spread}")
            table.setdefault(doc, {})[name] = stats
            lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    out = Path(a.out)
    (out / "seeds.json").write_text(json.dumps({"groups": files, "table": table}, indent=1) + "\n")
    (out / "seeds.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["train", "eval", "summarize", "seeds", "train-one", "eval-one"])
    p.add_argument("--base", default="", help="the converted SmolLM2 folder (train, eval)")
    p.add_argument("--work", default="/root/past4x", help="trained runs")
    p.add_argument("--out", default=os.environ.get("OUT", "results/experiments"), help="results")
    p.add_argument("--runs", nargs="*", default=[])
    p.add_argument("--run", default="")
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--model", default="")
    p.add_argument("--groups", nargs="*", default=[], help="seeds: NAME=EVAL_JSON,EVAL_JSON,...")
    p.add_argument("--docs", nargs="*", default=[])
    p.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--buckets", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--parallel", type=int, default=4)
    a = p.parse_args()
    {
        "train": train,
        "eval": evaluate,
        "summarize": summarize,
        "seeds": seeds,
        "train-one": train_one,
        "eval-one": eval_one,
    }[a.stage](a)


if __name__ == "__main__":
    main()
