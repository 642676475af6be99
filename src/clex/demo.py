"""`clex demo`: the paper's table in miniature, from nothing, on a CPU.

1. Pre-train a byte-level LLaMA from scratch with plain RoPE at a short original length L on the embedded
   Shakespeare plays (four whole plays held out).
2. Fine-tune copies of it, all with the same token budget (steps x rows x length) in the same training loop
   (the default scale runs the rows named in SCALES["default"]; ``--scale large`` runs them all):
   CLEX at L (the paper's "CLEX-4K") and at 4 L ("CLEX-16K"), each with the paper's dynamics and with the
   recommended recipe (:data:`RECOMMENDED`), and the baselines at 4 L — PI s=4, YaRN s=8, NTK s=4; ``large``
   adds YaRN s=4, naive fine-tuning, PoSE (PI s=4, L rows spanning 4 L), CLEX at L with PoSE positions and
   CLEX-16K with the paper's divided positions. The base model stays as it is.
3. Perplexity at L x {1, 2, 4, 8, 16} on the held-out plays (chunked protocol = one full forward).
4. ``results/demo/``: demo.json, demo.md (the table), demo.png (perplexity against length), models/ (every
   fine-tuned model, loadable with ``clex eval ... --models NAME=results/demo/models/NAME/final``).

Every stage is skipped when its output exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .core.io import atomic_write_text

#: The recommended CLEX dynamics (README "CLEX past 4x"): YaRN's NTK-by-parts as the prior the ODE learns a residual
#: of, YaRN's temperature, the angle cap, and the prior's shape past max_factor. The recommended recipe adds PoSE
#: positions (``pose``, a training field), as recipes/smollm2-clex-rec.yaml does.
RECOMMENDED = {"prior": "yarn", "mscale": "yarn", "angle_cap": True, "past_max": "prior"}

#: The far recipe (README "CLEX past 4x", session 6): P(t) ∝ t² and the log-length query scale in place of YaRN's
#: temperature; trained with max_factor 16 (the demo's CLEX factor) for use up to 16x.
FAR = {
    "prior": "yarn",
    "mscale": "none",
    "log_scale": True,
    "angle_cap": True,
    "past_max": "prior",
    "train_t": "integer-quadratic",
}

#: name -> (method, rows of k x L, factor, extra TrainConfig fields, the paper's row it mirrors)
VARIANTS: dict[str, tuple] = {
    "clex-rec-1x": (
        "clex",
        1,
        16,
        {"pose": True, "clex": RECOMMENDED},
        "CLEX-4K, recommended recipe (PoSE positions, as recipes/smollm2-clex-rec.yaml)",
    ),
    "clex-rec-4x": (
        "clex",
        4,
        16,
        {"pose": True, "clex": {"position_span": "original", **RECOMMENDED}},
        "CLEX-16K, recommended recipe (PoSE positions over L·t)",
    ),
    "clex-far-1x": (
        "clex",
        1,
        16,
        {"pose": True, "clex": FAR},
        "CLEX-4K, the far recipe (recipes/smollm2-clex-far.yaml)",
    ),
    "clex-far-4x": (
        "clex",
        4,
        16,
        {"pose": True, "clex": {"position_span": "original", **FAR}},
        "CLEX-16K, the far recipe (PoSE positions over L·t)",
    ),
    "clex-far8-4x": (
        "clex",
        4,
        8,
        {"pose": True, "clex": {"position_span": "original", **FAR}},
        "clex-far-4x with max_factor 8: P(t) ∝ t² on 1..8, the prior's shape past 8",
    ),
    "clex-rec-gaps-1x": (
        "clex",
        1,
        16,
        {"clex": RECOMMENDED},
        "CLEX-4K, recommended dynamics, the paper's random positions",
    ),
    "clex-rec-gaps-4x": (
        "clex",
        4,
        16,
        {"clex": {"position_span": "original", **RECOMMENDED}},
        "CLEX-16K, recommended dynamics, the paper's random positions over L·t",
    ),
    "clex-rec-lin-4x": (
        "clex",
        4,
        16,
        {"clex": {"position_span": "original", "train_t": "integer-linear", **RECOMMENDED}},
        "clex-rec-gaps-4x with P(t) ∝ t",
    ),
    "clex-rec-quad-4x": (
        "clex",
        4,
        16,
        {"clex": {"position_span": "original", "train_t": "integer-quadratic", **RECOMMENDED}},
        "clex-rec-gaps-4x with P(t) ∝ t²",
    ),
    "clex-1x": ("clex", 1, 16, {}, "CLEX-4K: trained at the original length"),
    "clex-pose-1x": ("clex", 1, 16, {"pose": True}, "CLEX-4K with PoSE positions instead of the paper's"),
    "clex-4x": (
        "clex",
        4,
        16,
        {"clex": {"position_span": "original"}},
        "CLEX-16K: trained at 4x the original length (integer positions over L·t)",
    ),
    "clex-4x-paper": ("clex", 4, 16, {}, "CLEX-16K with the paper's positions (divided by n // L)"),
    "pi-4x": ("pi", 4, 4, {}, "PI s=4 at 4x (paper: PI 16k)"),
    "yarn4-4x": ("yarn", 4, 4, {}, "YaRN s=4 at 4x (paper: YaRN s=16)"),
    "yarn8-4x": ("yarn", 4, 8, {}, "YaRN s=8 at 4x (paper: YaRN s=32)"),
    "ntk-4x": ("ntk", 4, 4, {}, "static NTK-aware s=4 at 4x (paper: CodeLLaMA)"),
    "naive-4x": ("none", 4, 4, {}, "plain RoPE fine-tuned at 4x"),
    "pose-pi-1x": ("pi", 1, 4, {"pose": True}, "PoSE + PI s=4: L rows spanning 4x"),
}


@dataclass
class DemoScale:
    """How big the miniature is. Token budget of each fine-tune = finetune_steps x rows x L."""

    preset: str  # a clex.presets model preset
    pretrain_steps: int
    pretrain_batch: int  # rows of L tokens
    pretrain_lr: float
    finetune_steps: int
    finetune_rows: int  # rows of L tokens per step (rows of k L tokens: finetune_rows // k)
    finetune_lr: float
    clex_lr: float = 2e-5  # lr of the CLEX ODE weights (the paper's lr; larger makes θ(t) jagged in short runs)
    lengths: tuple = (1, 2, 4, 8, 16)  # evaluation lengths, x L
    eval_samples: int = 4  # sequences per held-out play and length
    variants: tuple = tuple(VARIANTS)
    threads: int = 0  # torch threads (0: torch's default)


SCALES = {
    # CI smoke run: seconds of training, a couple of minutes in all; checks the plumbing, not the claim.
    "quick": DemoScale(
        "micro-llama",
        40,
        8,
        3e-3,
        8,
        8,
        1e-3,
        lengths=(1, 2, 4),
        eval_samples=1,
        variants=("clex-1x", "clex-rec-1x", "pi-4x", "yarn4-4x"),
    ),
    # The default: the paper's rows and the recommended recipe against the baselines (~10-14 min on 2 cores).
    "default": DemoScale(
        "tiny-llama",
        1200,
        16,
        2e-3,
        400,
        16,
        5e-4,
        variants=("clex-1x", "clex-rec-1x", "clex-4x", "clex-rec-4x", "pi-4x", "yarn8-4x", "ntk-4x"),
    ),
    # A larger CPU (or a longer wait): a bigger model, longer training.
    "large": DemoScale("small-llama", 4000, 32, 1e-3, 1000, 32, 3e-4, eval_samples=8),
}


def _train(cfg: dict, out: Path, label: str) -> tuple[Path, float]:
    """One TrainConfig run into ``out`` (skipped when out/final exists; resumed when checkpoints exist). A run
    already there that was trained with other settings (e.g. a variant whose definition changed) is refused."""
    from .train.checkpoints import list_checkpoints
    from .train.config import TrainConfig
    from .train.loop import run as train_run
    from .train.rundir import changed_fields

    final = out / "final"
    config = TrainConfig.from_dict({**cfg, "out_dir": str(out), "resume": bool(list_checkpoints(out))})
    changed = changed_fields(out, config)
    if changed:
        raise ValueError(
            f"{out} holds a {label} trained with other settings ({', '.join(changed)} differ): rerun with "
            "--overwrite (which deletes what the demo wrote in out_dir first) or give another --out-dir"
        )
    if (final / "config.json").is_file():
        print(f"[demo] {label}: already trained ({final})")
        return final, 0.0
    start = time.perf_counter()
    train_run(config)
    seconds = time.perf_counter() - start
    losses = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in losses if "loss" in r][-1:] or [{}]
    evals = [r["eval_loss"] for r in losses if "eval_loss" in r]
    print(
        f"[demo] {label}: {seconds:.0f} s, final train loss {last[0].get('loss', float('nan')):.3f}"
        + (f", held-out loss {evals[-1]:.3f}" if evals else "")
    )
    return final, seconds


def run(
    out_dir: str = "results/demo",
    quick: bool = False,
    scale: str = "default",
    seed: int = 0,
    overwrite: bool = False,
    variants: list[str] | None = None,
) -> dict:
    """Reproduce the paper's table in miniature: pre-train, fine-tune CLEX and baselines, perplexity vs length.

    Args:
        out_dir: where results and models go (stages already there are reused)
        quick: the CI smoke run (about two minutes; same as --scale quick)
        scale: quick | default | large
        seed: seed of every stage (model init, data order, t draws, evaluation windows)
        overwrite: delete what an earlier demo wrote in out_dir (models/, demo.*, ppl.*) instead of reusing its finished stages; other files stay
        variants: the fine-tunes to run (default: the scale's), names from demo.VARIANTS, e.g. clex-4x yarn8-4x
    """
    from .data.presets import MODEL_PRESETS
    from .eval.perplexity import run_ppl

    scale = "quick" if quick else scale
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    s = SCALES[scale]
    if variants:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
        s = dataclasses.replace(s, variants=tuple(variants))
    out = Path(out_dir)
    if overwrite:
        _remove_earlier_demo(out)
    models = out / "models"
    L = int(MODEL_PRESETS[s.preset]["max_position_embeddings"])
    t0 = time.perf_counter()
    times = {}
    common = dict(
        seed=seed,
        threads=s.threads,
        save_every=max(1, s.finetune_steps // 2),
        log_every=max(1, s.finetune_steps // 10),
        eval_every=0,
        held_out=0.02,
        warmup_ratio=0.03,
        schedule="cosine",
        weight_decay=0.0,
    )

    print(
        f"[demo] scale {scale}: {s.preset}, L = {L}; pre-training {s.pretrain_steps} steps x {s.pretrain_batch} x {L} tokens"
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
        save_every=max(1, s.pretrain_steps // 4),
        log_every=max(1, s.pretrain_steps // 20),
    )
    base, times["pretrain"] = _train(base_cfg, models / "base", "pre-training (plain RoPE)")

    budget = s.finetune_steps * s.finetune_rows * L
    print(f"[demo] fine-tuning {len(s.variants)} variants, {budget:,} tokens each")
    finals = {"base": base}
    for name in s.variants:
        method, k, factor, extra, _ = VARIANTS[name]
        cfg = dict(
            common,
            model=str(base),
            method=method,
            factor=factor,
            seq_len=k * L,
            steps=s.finetune_steps,
            batch_size=max(1, s.finetune_rows // k),
            lr=s.finetune_lr,
            **extra,
        )
        if method == "clex":
            cfg["clex_lr"] = s.clex_lr
        finals[name], times[name] = _train(cfg, models / name, f"{name} ({method}, rows of {k} x L)")

    lengths = [L * k for k in s.lengths]
    start = time.perf_counter()
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
    times["evaluation"] = time.perf_counter() - start
    table = _paper_table(payload, s, L)
    wall = time.perf_counter() - t0
    summary = {
        "scale": asdict(s),
        "L": L,
        "token_budget": budget,
        "seconds": times,
        "wall_seconds": wall,
        "table": table,
        "ppl": payload["paths"],
    }
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    md = _markdown(table, lengths, L, wall, scale)
    atomic_write_text(out / "demo.md", md)
    shutil.copyfile(out / "ppl.png", out / "demo.png")
    print("\n" + md)
    return summary


def _remove_earlier_demo(out: Path) -> None:
    """What a demo writes in ``out`` (its models and its tables), and nothing else of the folder."""
    if (out / "models").is_dir():
        shutil.rmtree(out / "models")
    for name in ("demo", "ppl"):
        for suffix in (".json", ".md", ".png", ".partial.json"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)


def _paper_table(payload: dict, s: DemoScale, L: int) -> list[dict]:
    rows = []
    for name, v in payload["models"].items():
        method, k, factor, _, mirrors = VARIANTS.get(name, ("none", 1, 1, {}, "the pre-trained model, untouched"))
        ppl = {int(n): r["ppl"] for n, r in v["results"].items()}
        rows.append(
            {"model": name, "trained at": f"{k} x L" if name != "base" else "1 x L", "mirrors": mirrors, "ppl": ppl}
        )
    return rows


def _markdown(table: list[dict], lengths: list[int], L: int, wall: float, scale: str) -> str:
    head = "| model | trained at | " + " | ".join(f"{n // L}x ({n})" for n in lengths) + " | mirrors |"
    lines = [
        f"# clex demo ({scale}): perplexity (bytes) on held-out plays, L = {L}",
        "",
        head,
        "|" + "---|" * (len(lengths) + 3),
    ]
    best = {n: min(r["ppl"][n] for r in table) for n in lengths}
    for r in table:
        cells = [
            (f"**{r['ppl'][n]:.3f}**" if math.isclose(r["ppl"][n], best[n]) else f"{r['ppl'][n]:.3f}") for n in lengths
        ]
        lines.append(f"| {r['model']} | {r['trained at']} | " + " | ".join(cells) + f" | {r['mirrors']} |")
    lines += ["", f"Wall time {wall / 60:.1f} min. Lower is better; bold: the best at that length.", ""]
    return "\n".join(lines)
