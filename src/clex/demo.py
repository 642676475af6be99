"""`clex demo`: one model for every length, in miniature, from nothing, on a CPU.

1. Pre-train a byte-level LLaMA from scratch with plain RoPE at a short original length L on the embedded
   Shakespeare plays (four whole plays held out).
2. Fine-tune copies of it, all with the same token budget (steps x rows x length) in the same training loop,
   several at once (a process of one torch thread each). The default: the recommended and far recipes of
   :mod:`clex.recipes` against YaRN s=8, YaRN s=16 and PI s=4, all on rows of 4 L; ``--scale large`` or
   ``--variants`` run the others of :data:`clex.demo_variants.VARIANTS` (the paper's recipe, its parts, more
   baselines). The base model stays as it is.
3. Perplexity at L x {1, 2, 4, 8, 16} on the held-out plays (chunked protocol = one full forward), and each
   model's perplexity over the best model's at each length (:func:`clex.eval.compare.ratio_to_best`).
4. ``results/demo/``: demo.json (tables, seed, each stage's wall and CPU seconds), demo.md (the two tables),
   demo.png (perplexity and ratio against length), ppl.* and ratio.* (the evaluations), models/ (every model,
   loadable with ``clex eval ppl --models NAME=results/demo/models/NAME/final``; each fine-tune's log beside it).

Every stage is skipped when its output exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from .core.io import atomic_write_bytes, atomic_write_text
from .demo_variants import SCALES, VARIANTS, DemoScale, ScaleName, VariantName

#: What the demo writes into out_dir (and what ``overwrite`` removes: nothing else there is touched).
OUTPUTS = ("models", *(f"{name}{suffix}" for name in ("demo", "ppl", "ratio") for suffix in (".json", ".md", ".png")))
OUTPUTS += ("ppl.partial.json",)


def run(
    out_dir: str = "results/demo",
    scale: ScaleName = "default",
    seed: int = 0,
    overwrite: bool = False,
    variants: list[VariantName] | None = None,
    workers: int | None = None,
) -> dict:
    """One model for every length, in miniature: pre-train, fine-tune the CLEX recipes and baselines, compare.

    Args:
        out_dir: where results and models go (stages already there are reused)
        scale: quick (the CI smoke run: the plumbing, not the claim), default, or large (every variant, a bigger model)
        seed: seed of every stage (model init, data order, t draws, evaluation windows)
        overwrite: remove what an earlier demo wrote in out_dir (models/, demo.*, ppl.*, ratio.*) instead of reusing its finished stages; other files stay
        variants: the fine-tunes to run (default: the scale's), names of clex.demo_variants.VARIANTS
        workers: fine-tunes at once, one process of one thread each (default: the scale's; 0: all; 1: one by one)
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    s = SCALES[scale]
    if variants:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
        s = dataclasses.replace(s, variants=tuple(dict.fromkeys(variants)))
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0 (0: every fine-tune at once), got {workers!r}")
        s = dataclasses.replace(s, workers=workers)

    from .data.presets import MODEL_PRESETS

    out = Path(out_dir)
    if overwrite:
        for name in OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    models = out / "models"
    L = int(MODEL_PRESETS[s.preset]["max_position_embeddings"])
    t0 = time.perf_counter()
    wall, cpu = {}, {}
    common = dict(
        seed=seed,
        held_out=0.02,
        warmup_ratio=0.03,
        schedule="cosine",
        weight_decay=0.0,
        eval_every=0,
    )

    print(
        f"[demo] scale {scale}: {s.preset}, L = {L}, seed {seed}; pre-training {s.pretrain_steps} steps x "
        f"{s.pretrain_batch} x {L} tokens"
    )
    base_cfg = dict(
        common,
        model=s.preset,
        method="none",
        factor=1,
        seq_len=L,
        steps=s.pretrain_steps,
        batch_size=s.pretrain_batch,
        lr=s.pretrain_lr,
        threads=s.threads,
        save_every=max(1, s.pretrain_steps // 4),
        log_every=max(1, s.pretrain_steps // 20),
    )
    base, wall["pretrain"], cpu["pretrain"] = _train(base_cfg, models / "base", "pre-training (plain RoPE)")

    budget = s.finetune_steps * s.finetune_rows * L
    jobs = {}
    for name in s.variants:
        v = VARIANTS[name]
        cfg = dict(
            common,
            model=str(base),
            seq_len=v.rows * L,
            steps=s.finetune_steps,
            batch_size=max(1, s.finetune_rows // v.rows),
            lr=s.finetune_lr,
            **({"clex_lr": s.clex_lr} if v.recipe else {}),
            save_every=max(1, s.finetune_steps // 2),
            log_every=max(1, s.finetune_steps // 10),
            **v.train_fields(),
        )
        jobs[name] = (cfg, models / name, f"{name} ({v.recipe or v.method}, rows of {v.rows} x L)")
    finals = {"base": base, **_finetune(jobs, s.workers, s.threads, budget, wall, cpu)}

    from .eval.compare import run_compare
    from .eval.perplexity import run_ppl

    lengths = [L * k for k in s.lengths]
    if s.threads:  # set here too: when every training stage was reused, no training run has set it
        import torch

        torch.set_num_threads(s.threads)
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    payload = run_ppl(
        [f"{n}={p}" for n, p in finals.items()],
        lengths=lengths,
        protocol="chunked",
        samples=s.eval_samples,
        seed=seed,
        out_dir=str(out),
        name="ppl",
        plot=True,
        overwrite=True,  # the demo's own table, remade from its models on every run
    )
    ratio = run_compare([payload["paths"]["json"]], out_dir=str(out), name="ratio", plot=True, overwrite=True)
    wall["evaluation"], cpu["evaluation"] = time.perf_counter() - start, _cpu_seconds() - start_cpu
    table = _table(payload, ratio, L)
    summary = {
        "scale": dataclasses.asdict(s),
        "seed": seed,
        "machine": _machine(),
        "L": L,
        "token_budget": budget,
        "seconds": wall,
        "cpu_seconds": cpu,  # user + sys of the process that ran the stage (all its threads)
        "wall_seconds": time.perf_counter() - t0,
        "table": table,
        "paths": {
            **{f"ppl_{k}": v for k, v in payload["paths"].items()},
            **{f"ratio_{k}": v for k, v in ratio["paths"].items()},
        },
    }
    _figure(table, lengths, out / "demo.png")
    md = _markdown(summary, lengths, scale)
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "demo.md", md)
    print("\n" + md)
    return summary


# --- training -------------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _check_run(cfg: dict, out: Path, label: str) -> bool:
    """True when ``out`` holds the finished run; a run there trained with other settings (e.g. a variant whose
    definition changed) is refused."""
    from .train.config import TrainConfig
    from .train.rundir import changed_fields

    changed = changed_fields(out, TrainConfig.from_dict({**cfg, "out_dir": str(out)}))
    if changed:
        raise ValueError(
            f"{out} holds a {label} trained with other settings ({', '.join(changed)} differ): rerun with "
            "--overwrite (which removes the demo's results and models in out_dir first) or give another --out-dir"
        )
    return (out / "final" / "config.json").is_file()


def _run_training(cfg: dict, out: Path) -> tuple[float, float]:
    """Train (resumed when checkpoints exist) -> (wall seconds, CPU seconds) of this process."""
    from .train.checkpoints import list_checkpoints
    from .train.config import TrainConfig
    from .train.loop import run as train_run

    config = TrainConfig.from_dict({**cfg, "out_dir": str(out), "resume": bool(list_checkpoints(out))})
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    train_run(config)
    return time.perf_counter() - start, _cpu_seconds() - start_cpu


def _train(cfg: dict, out: Path, label: str) -> tuple[Path, float, float]:
    """One run in this process (skipped when out/final exists) -> (final model, wall seconds, CPU seconds)."""
    if _check_run(cfg, out, label):
        print(f"[demo] {label}: already trained ({out / 'final'})")
        return out / "final", 0.0, 0.0
    seconds, cpu = _run_training(cfg, out)
    print(f"[demo] {label}: {seconds:.0f} s ({cpu:.0f} CPU s), {_losses(out)}")
    return out / "final", seconds, cpu


def _machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}


def _losses(out: Path) -> str:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    last = [r["loss"] for r in records if "loss" in r][-1:] or [float("nan")]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return f"final train loss {last[0]:.3f}" + (f", held-out loss {evals[-1]:.3f}" if evals else "")


def _worker_init(parent: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported in this process: one thread, no spinning pool

    def watch():  # the demo was killed (a SIGTERM ends it without cleaning up): stop too, leave nothing running
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _train_logged(cfg: dict, out: Path) -> tuple[float, float]:
    """A worker's job: one run, its printed output into out/train.log."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
        return _run_training(cfg, out)


def _finetune(jobs: dict, workers: int, threads: int, budget: int, wall: dict, cpu: dict) -> dict[str, Path]:
    """Every job (name -> (config, out, label)) not yet trained, ``workers`` at once (0: all), each in a process of
    one thread; one at a time: here, with ``threads`` -> {name: final model}."""
    from tqdm.auto import tqdm

    todo = {name: job for name, job in jobs.items() if not _check_run(*job)}
    for name in [n for n in jobs if n not in todo]:
        print(f"[demo] {jobs[name][2]}: already trained ({jobs[name][1] / 'final'})")
        wall[name] = cpu[name] = 0.0
    at_once = min(len(todo), workers or len(todo))
    if todo:
        print(f"[demo] fine-tuning {len(todo)} variants, {budget:,} tokens each, {at_once} at once")
    if at_once == 1:
        for name, (cfg, out, label) in todo.items():
            _, wall[name], cpu[name] = _train({**cfg, "threads": threads}, out, label)
    elif at_once > 1:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool forked
        with concurrent.futures.ProcessPoolExecutor(
            at_once, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
        ) as pool:
            futures = {
                pool.submit(_train_logged, {**cfg, "threads": 1}, out): name for name, (cfg, out, _) in todo.items()
            }
            with tqdm(total=len(futures), desc="fine-tunes", unit="model", dynamic_ncols=True) as bar:
                for future in concurrent.futures.as_completed(futures):
                    name = futures[future]
                    try:
                        wall[name], cpu[name] = future.result()
                    except BaseException:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
                    cfg, out, label = jobs[name]
                    bar.write(f"[demo] {label}: {wall[name]:.0f} s ({cpu[name]:.0f} CPU s), {_losses(out)}")
                    bar.update()
    return {name: out / "final" for name, (_, out, _) in jobs.items()}


# --- results --------------------------------------------------------------------------------------------------


def _table(payload: dict, ratio: dict, L: int) -> list[dict]:
    """One row per model: where it was trained, what it mirrors, its perplexity and ratio to the best by length."""
    rows = []
    for name, entry in payload["models"].items():
        v = VARIANTS.get(name)
        rows.append(
            {
                "model": name,
                "trained at": f"{v.rows if v else 1} x L",
                "mirrors": v.mirrors if v else "the pre-trained model, untouched",
                "ppl": {int(n): r["ppl"] for n, r in entry["results"].items()},
                "ratio": {int(n): r for n, r in ratio["models"][name]["ratio"].items()},
                "worst": ratio["models"][name]["worst"],
            }
        )
    return rows


def _markdown(summary: dict, lengths: list[int], scale: str) -> str:
    table, L = summary["table"], summary["L"]
    cols = " | ".join(f"{n // L}x ({n})" for n in lengths)
    best = {n: min(r["ppl"][n] for r in table) for n in lengths}

    def cells(r, key, fmt):
        bold = [math.isclose(r["ppl"][n], best[n]) for n in lengths]
        return " | ".join(f"**{fmt(r[key][n])}**" if b else fmt(r[key][n]) for n, b in zip(lengths, bold))

    lines = [
        f"# clex demo ({scale}, seed {summary['seed']}): one model for every length, L = {L}",
        "",
        "Perplexity (per byte) on the held-out plays; lower is better, bold: the best model at that length.",
        "",
        f"| model | trained at | {cols} | mirrors |",
        "|" + "---|" * (len(lengths) + 3),
        *(
            f"| {r['model']} | {r['trained at']} | {cells(r, 'ppl', lambda x: f'{x:.3f}')} | {r['mirrors']} |"
            for r in table
        ),
        "",
        "Each model's perplexity over the best model's at each length (1.000 = the best); worst: its largest ratio.",
        "",
        f"| model | {cols} | worst |",
        "|" + "---|" * (len(lengths) + 2),
        *(f"| {r['model']} | {cells(r, 'ratio', lambda x: f'{x:.3f}')} | {r['worst']:.3f} |" for r in table),
        "",
        "Wall (CPU) seconds: "
        + ", ".join(f"{k} {v:.0f} ({summary['cpu_seconds'][k]:.0f})" for k, v in summary["seconds"].items())
        + f"; in all {summary['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def _figure(table: list[dict], lengths: list[int], out: Path) -> None:
    """Perplexity and ratio to the best against length, side by side, one colour per model in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    for r in table:
        (line,) = left.plot(lengths, [r["ppl"][n] for n in lengths], marker="o", label=r["model"])
        label = f"{r['model']} (worst {r['worst']:.2f})"
        right.plot(lengths, [r["ratio"][n] for n in lengths], marker="o", color=line.get_color(), label=label)
    right.axhline(1.0, color="grey", linewidth=1)
    left.set_yscale("log")
    left.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    left.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    for ax, ylabel, title in (
        (left, "perplexity (per byte, log scale)", "Perplexity on the held-out plays"),
        (right, "perplexity / the best model's", "Ratio to the best model at each length (1 = best)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="evaluation length (tokens)", ylabel=ylabel, title=title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())


__all__ = ["SCALES", "VARIANTS", "DemoScale", "run"]
