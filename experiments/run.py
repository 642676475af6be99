"""The GPU experiment runner: fine-tune SmolLM2-135M with CLEX and the baselines side by side, evaluate, compare.

Each stage spreads its jobs over several processes on one GPU (a 135M model at 8k rows leaves most of an H200
idle, so N runs side by side cost about what one does):

    python experiments/run.py train --base BASE --work W --out OUT --parallel 11 --steps 200 \
        --runs far-s0=clex-far:save_adapter=true yarn16-s0=yarn:factor=16 every-s1=experiments/one-model-every-length/every.yaml:seed=1 ...
    python experiments/run.py eval --base BASE --work W --out OUT --parallel 5 \
        --docs plays=plays.txt kjv=kjv.txt --lengths 8192,16384,32768,65536,131072 \
        --models far-s0=far-s0 prior=base:clex=1 far-on-yarn16=far-s0:weights_only=1,yarn=16 ...
    python experiments/run.py compare --out OUT --results OUT/eval_*.json PAST/eval_yarn8-s1.json ... \
        --groups far=far-s0,c16q-logn-only,... yarn16=yarn16-s0,yarn16-s1,...
    python experiments/run.py attention --base BASE --work W --out OUT --docs ... --models far-s0=far-s0 ...
    python experiments/run.py artifact --work W --run far-s0 --out DIR    # adapter + CLEX weights (a few MB)
    python experiments/run.py rebuild --base BASE --artifact DIR --out MODEL   # a clex model folder again

--runs NAME=RECIPE[:KEY=VALUE,...]: recipes/smollm2-RECIPE.yaml (or RECIPE itself where it is a .yaml path) with the
same budget for every run (steps x
batch x seq_len) plus these TrainConfig overrides (``steps=1000`` gives one run a larger budget; ``save_every=100``
checkpoints it); trained into W/NAME (skipped if W/NAME/final exists; an interrupted run resumes from its latest
checkpoint, or starts again if it left none).
--models NAME=SOURCE[:KEY=VALUE,...], SOURCE a trained run's name or ``base``. Keys: CLEXConfig fields
(changed at load time, e.g. angle_cap=true), ``clex=1`` (apply CLEX fresh: the untrained prior; ``clex=far``:
a recipe of clex.recipes, fresh),
``yarn=S`` (transformers' YaRN factor S, untrained; ``attention_factor=A`` sets its temperature on cos/sin),
``ode=zero`` (the ODE weights zeroed: the run's LoRA with the prior θ(t)), ``ode_from=RUN`` (the base model with
RUN's ODE weights: the learned θ(t) alone), ``weights_only=1`` (the run's fine-tuned weights as a plain-RoPE
model: its CLEX or YaRN dropped), ``clex_from=RUN`` (those weights with RUN's CLEX: its config, ODE weights and
learned temperature; further CLEXConfig keys override).

Every evaluation: chunked perplexity (= one full forward, CLEX's t pinned to the window length) on
``samples`` windows per length of each document, the mean NLL of each of ``buckets`` position buckets, and at
the 8x length the content-controlled ratio: the last L tokens of the window scored with the whole window as
context against the same tokens scored with only the L tokens before them (ppl ratio; <= 1: more context
did not hurt). Results: OUT/eval_<model>.json, OUT/ppl.{json,md,png}. ``compare`` writes each document's
results in the format of ``clex eval ppl`` and makes the ratio-to-best table with ``clex eval compare``
(OUT/ratio_<doc>.{json,md,png}). ``attention``: per layer, the entropy of the attention of sampled queries and the
share of it on keys more than L back, per position bucket (OUT/attention_<model>.json, attention.{md,png}).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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
        recipe if recipe.endswith((".yaml", ".yml")) else f"recipes/smollm2-{recipe}.yaml",
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


def _plain(folder: Path, **kw):
    """The folder's weights as a plain-RoPE model: its CLEX (ODE, temperature, adapters) or YaRN left out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from clex.hf.loading import clex_config_of, read_config

    _, raw = clex_config_of(read_config(folder))
    rope = dict(raw.get("rope_parameters") or {})
    raw["max_position_embeddings"] = rope.get("original_max_position_embeddings") or raw["max_position_embeddings"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": rope.get("rope_theta", raw.get("rope_theta"))}
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=kw["dtype"]).to(kw["device"])


def _load(a, spec: str):
    import torch
    from transformers import AutoTokenizer

    import clex
    import clex.recipes
    from clex.eval.specs import parse_params
    from clex.hf.methods import prepare_model

    name, _, rest = spec.partition("=")
    source, _, params = rest.partition(":")
    params = parse_params(params, f"--models {spec!r}")
    folder = Path(a.base) if source == "base" else Path(a.work) / source / "final"
    keys = ("ode", "ode_from", "clex", "yarn", "attention_factor", "weights_only", "clex_from")
    ode, ode_from, fresh, yarn, factor, weights_only, clex_from = (params.pop(k, None) for k in keys)
    kw = dict(dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    if weights_only or clex_from:
        model = _plain(folder, **kw)
    elif fresh or ode_from:  # clex=NAME: a recipe of clex.recipes; clex=1: CLEXConfig's defaults at max_factor 8
        fields = clex.recipes.get(fresh).clex_config().to_dict() if isinstance(fresh, str) else {"max_factor": 8}
        model = clex.load_model(folder, clex=clex.CLEXConfig.from_dict({**fields, **params}), **kw)
    else:
        model = clex.load_model(folder, **params, **kw)
    if yarn:
        prepare_model(model, "yarn", factor=float(yarn), rope={"attention_factor": float(factor)} if factor else None)
    if clex_from:  # another run's CLEX on these weights: its config (load-time keys override), ODE, temperature
        src = clex.get_clex_rotary(clex.load_model(Path(a.work) / clex_from / "final", **kw))
        config = src.config.replace(**params, adapter_rank=0)  # t-conditioned adapters belong to their weights
        rotary = clex.get_clex_rotary(clex.apply_clex(model, config))
        rotary.dynamics.load_state_dict(src.dynamics.state_dict())
        if src.temperature is not None and rotary.temperature is not None:
            with torch.no_grad():
                rotary.temperature.copy_(src.temperature)
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
    (out / "ppl.json").write_text(json.dumps(results, indent=1) + "\n")
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
    (out / "ppl.md").write_text("\n".join(lines))
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
        fig.savefig(out / "ppl.png", dpi=110)
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


def compare(a) -> None:
    """The ratio-to-best table of each document by ``clex eval compare``: every --results file (eval_<model>.json
    of this runner, any folder) is written per document in the format of ``clex eval ppl`` (OUT/compare/<doc>.json,
    one model per file name), then compared with --groups (NAME=MODEL,MODEL,...: averaged as one, e.g. seeds)."""
    from clex.eval.compare import run_compare

    names = [Path(f).stem.removeprefix("eval_") for f in a.results]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"compare: --results name the model(s) {twice} more than once (one file per model name)")
    runs = {n: json.loads(Path(f).read_text()) for n, f in zip(names, a.results)}
    lengths = [int(x) for x in a.lengths.split(",")]
    folder = Path(a.out) / "compare"
    folder.mkdir(parents=True, exist_ok=True)
    for doc in sorted({d for r in runs.values() for d in r["docs"]}):
        models = {
            name: {
                "spec": r.get("model", name),
                "original_length": 8192,
                "results": {str(n): r["docs"][doc][str(n)] for n in lengths if str(n) in r["docs"].get(doc, {})},
            }
            for name, r in runs.items()
            if doc in r["docs"]
        }
        payload = {"task": "perplexity", "config": {"documents": doc, "lengths": lengths}, "models": models}
        (folder / f"{doc}.json").write_text(json.dumps(payload, indent=1) + "\n")
        run_compare([str(folder / f"{doc}.json")], groups=a.groups, out_dir=a.out, name=f"ratio_{doc}")
        print((Path(a.out) / f"ratio_{doc}.md").read_text(), flush=True)


# --- attention at long range ------------------------------------------------------------------------------


def attention_one(a) -> None:
    """One model: a full forward over one window per document at --lengths' first length (CLEX's t pinned to it);
    in every layer, the attention of ``--queries`` sampled queries per position bucket, computed apart from the
    model's own (sdpa) attention from the same post-RoPE queries and keys and the same scaling: its entropy (nats)
    and the share of its mass on keys more than L back, averaged over heads and the bucket's queries."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from clex.eval.specs import fixed_clex_t

    name, model, tok = _load(a, a.model)
    n, L = int(a.lengths.split(",")[0]), 8192
    edges = [round(i * n / a.buckets) for i in range(a.buckets + 1)]
    picks = [
        round(lo + (hi - lo) * (k + 0.5) / a.queries) for lo, hi in zip(edges, edges[1:]) for k in range(a.queries)
    ]
    stats: dict[int, dict] = {}

    def probe(module, query, key, value, attention_mask, scaling=None, **kw):
        with torch.no_grad():
            pos = torch.tensor(picks, device=query.device)
            q = query[0, :, pos].float()  # [H, s, d]
            k = key[0].float().repeat_interleave(query.shape[1] // key.shape[1], dim=0)  # [H, S, d]
            logits = (q @ k.transpose(-1, -2)) * scaling  # [H, s, S]
            keys = torch.arange(k.shape[1], device=q.device)
            logits.masked_fill_(keys[None, None, :] > pos[None, :, None], float("-inf"))
            p = logits.softmax(-1)
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(0)  # [s]
            far = (p * (keys[None, None, :] < pos[None, :, None] - L)).sum(-1).mean(0)  # [s]
            row = stats.setdefault(module.layer_idx, {"entropy": [], "far_mass": []})
            row["entropy"].append(entropy.view(a.buckets, a.queries).mean(-1).tolist())
            row["far_mass"].append(far.view(a.buckets, a.queries).mean(-1).tolist())
            del logits, p, k
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register("sdpa", probe)
    result = {"model": a.model, "length": n, "bucket_edges": edges, "queries_per_bucket": a.queries, "docs": {}}
    for doc in a.docs:
        label, _, path = doc.partition("=")
        ids = torch.tensor(tok(Path(path).read_text(), add_special_tokens=False)["input_ids"])[:n]
        stats.clear()
        with torch.no_grad(), fixed_clex_t(model, n):
            model.get_decoder()(input_ids=ids[None].to(model.device), use_cache=False)
        result["docs"][label] = {
            str(layer): {k: [sum(col) / len(col) for col in zip(*v)] for k, v in row.items()}
            for layer, row in sorted(stats.items())
        }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"attention_{name}.json").write_text(json.dumps(result, indent=1) + "\n")


def attention(a) -> None:
    jobs = [
        [
            sys.executable,
            __file__,
            "attention-one",
            "--base",
            a.base,
            "--work",
            a.work,
            "--out",
            a.out,
            "--lengths",
            a.lengths,
            "--buckets",
            str(a.buckets),
            "--queries",
            str(a.queries),
            "--docs",
            *a.docs,
            "--model",
            spec,
        ]
        for spec in a.models
    ]
    _parallel(jobs, a.parallel, Path(a.work) / "logs-attention")
    attention_table(a)


def attention_table(a) -> None:
    """OUT/attention.md (the last bucket's entropy and far mass per layer, each model) and attention.png."""
    out = Path(a.out)
    runs = {p.stem.removeprefix("attention_"): json.loads(p.read_text()) for p in sorted(out.glob("attention_*.json"))}
    if not runs:
        return
    lines = []
    for doc in sorted({d for r in runs.values() for d in r["docs"]}):
        layers = sorted({int(k) for r in runs.values() for k in r["docs"].get(doc, {})})
        lines += [
            f"### {doc}: the last position bucket's queries, entropy (nats) / share of attention on keys more than L back",
            "",
            "| layer | " + " | ".join(runs) + " |",
            "|---|" + "---|" * len(runs),
        ]
        for layer in layers:
            cells = []
            for r in runs.values():
                row = r["docs"].get(doc, {}).get(str(layer))
                cells.append(f"{row['entropy'][-1]:.2f} / {row['far_mass'][-1]:.3f}" if row else "–")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        mean = [statistics.fmean(r["docs"][doc][str(k)]["entropy"][-1] for k in layers) for r in runs.values()]
        lines += ["| mean | " + " | ".join(f"{m:.2f}" for m in mean) + " |", ""]
    (out / "attention.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = sorted({d for r in runs.values() for d in r["docs"]})
    fig, axes = plt.subplots(2, len(docs), figsize=(6 * len(docs), 8), squeeze=False)
    for j, doc in enumerate(docs):
        for name, r in runs.items():
            rows = r["docs"].get(doc, {})
            layers = sorted(rows, key=int)
            axes[0][j].plot([int(k) for k in layers], [rows[k]["entropy"][-1] for k in layers], marker="o", label=name)
            axes[1][j].plot([int(k) for k in layers], [rows[k]["far_mass"][-1] for k in layers], marker="o", label=name)
        axes[0][j].set(title=f"{doc}: attention entropy, last bucket", xlabel="layer", ylabel="nats")
        axes[1][j].set(title=f"{doc}: share on keys > L back", xlabel="layer", ylabel="share")
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=110)


# --- the adapter and CLEX weights of one run, and a model folder rebuilt from them ---------------------------

ARTIFACT_FILES = ("config.json", "clex_train.yaml", "generation_config.json")


def artifact(a) -> None:
    """OUT: the run's LoRA adapter (adapter/, peft's format: train it with save_adapter=true), its CLEX weights
    (clex_weights.safetensors: the ODE, and the learned temperature and t-conditioned adapters if it has them)
    and its config files; a few MB instead of the merged model."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    final, out = Path(a.work) / a.run / "final", Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(final / "adapter", out / "adapter", dirs_exist_ok=True)
    for name in ARTIFACT_FILES:
        if (final / name).is_file():
            shutil.copyfile(final / name, out / name)
    tensors = {}
    for file in sorted(final.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if clex_only(k)})
    save_file(tensors, str(out / "clex_weights.safetensors"), metadata={"format": "pt"})
    print(f"artifact of {a.run}: {sorted(p.name for p in out.iterdir())}; CLEX tensors {sorted(tensors)[:4]}...")


def clex_only(key: str) -> bool:
    """A tensor that CLEX adds to a plain model: the ODE, the learned temperature, the t-conditioned adapters."""
    return ".dynamics." in key or key.endswith("rotary_emb.temperature") or ".clex_adapter." in key


def rebuild(a) -> None:
    """A clex model folder from an artifact and the plain base model: CLEX applied with the artifact's config,
    the LoRA adapter merged (peft), the CLEX weights loaded, saved with the base's tokenizer."""
    import shutil

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import clex
    from clex.hf.loading import read_config
    from clex.hf.patch import split_rope_parameters

    art = Path(a.artifact)
    config, _ = split_rope_parameters(read_config(art)["rope_parameters"])
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    clex.apply_clex(model, config)
    model = PeftModel.from_pretrained(model, art / "adapter").merge_and_unload()
    missing = set(load_file(str(art / "clex_weights.safetensors"))) - set(model.state_dict())
    if missing:
        raise SystemExit(f"{art}: CLEX tensors this model has no place for: {sorted(missing)}")
    model.load_state_dict(load_file(str(art / "clex_weights.safetensors")), strict=False)
    model.save_pretrained(a.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(a.base) / name).is_file():
            shutil.copyfile(Path(a.base) / name, Path(a.out) / name)
    print(f"rebuilt {a.out} from {art} and {a.base}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "stage",
        choices=[
            "train",
            "eval",
            "summarize",
            "seeds",
            "compare",
            "attention",
            "artifact",
            "rebuild",
            "train-one",
            "eval-one",
            "attention-one",
        ],
    )
    p.add_argument("--base", default="", help="the converted SmolLM2 folder (train, eval)")
    p.add_argument("--work", default="runs/experiments", help="trained runs (W/NAME/final)")
    p.add_argument("--out", default=os.environ.get("OUT", "results/experiments"), help="results")
    p.add_argument("--runs", nargs="*", default=[])
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--model", default="")
    p.add_argument("--groups", nargs="*", default=[], help="seeds: NAME=EVAL_JSON,...; compare: NAME=MODEL,...")
    p.add_argument("--results", nargs="*", default=[], help="compare: eval_<model>.json files")
    p.add_argument("--queries", type=int, default=8, help="attention: sampled queries per position bucket")
    p.add_argument("--run", default="", help="train-one: the run; artifact: the trained run to pack")
    p.add_argument("--artifact", default="", help="rebuild: the folder `artifact` wrote")
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
        "compare": compare,
        "attention": attention,
        "artifact": artifact,
        "rebuild": rebuild,
        "train-one": train_one,
        "eval-one": eval_one,
        "attention-one": attention_one,
    }[a.stage](a)


if __name__ == "__main__":
    main()
