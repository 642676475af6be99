"""Figures (matplotlib, Agg): perplexity against length, the retrieval heatmap, and CLEX's learned θ(t).

- :func:`plot_ppl`: one line per model from a ``clex eval ppl`` payload; each training length L marked.
- :func:`plot_retrieval`: accuracy by length x depth, one heatmap per model.
- :func:`plot_ruler`: RULER score by task x length, one heatmap per model.
- :func:`plot_freqs`: θ_j(t) / θ_j(1) of a CLEX model against the pair index j, beside PI (``linear``),
  static NTK (α = t: the base x t^(d/(d-2)), computed by ``dynamic`` at t·L tokens) and YaRN for the same t, all three from transformers' ``ROPE_INIT_FUNCTIONS``;
  and the CLEX prior (NTK with α = 2t − 1, what an untrained CLEX gives), so the learned part shows.
"""

from __future__ import annotations

import copy
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.io import atomic_write_bytes, atomic_write_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(out).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(out, buffer.getvalue())


def plot_ppl(payload: dict, out: str | Path, *, title: str | None = None) -> Path:
    """Perplexity (log scale) against length (log2 scale), one line per model; dashed verticals at each L."""
    plt = _pyplot()
    models = payload.get("models") or {}
    if not models:
        raise ValueError("plot_ppl needs a payload with at least one model under 'models', got none")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in models.items():
        results = sorted(entry["results"].items(), key=lambda kv: int(kv[0]))
        xs = [int(k) for k, _ in results]
        ys = [r["ppl"] if r["ppl"] is not None else float("nan") for _, r in results]
        lo = [y - (r.get("ppl_std") or 0) for y, (_, r) in zip(ys, results)]
        hi = [y + (r.get("ppl_std") or 0) for y, (_, r) in zip(ys, results)]
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        ax.fill_between(xs, [max(v, 1e-9) for v in lo], hi, color=line.get_color(), alpha=0.12)
    for length in sorted({e.get("original_length") for e in models.values()} - {None}):
        ax.axvline(length, color="grey", linestyle="--", linewidth=1)
        ax.annotate(
            f"L={length}",
            (length, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="grey",
        )
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({int(k) for e in models.values() for k in e["results"]})
    ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45 if len(lengths) > 6 else 0)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    protocol = (payload.get("config") or {}).get("protocol", "")
    ax.set_title(title or f"Perplexity by length ({protocol})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_ratios(payload: dict, out: str | Path, *, title: str | None = None) -> Path:
    """Each model's perplexity over the best model's (:mod:`clex.eval.compare`) against length (log2 scale)."""
    plt = _pyplot()
    models = payload.get("models") or {}
    if not models:
        raise ValueError("plot_ratios needs a payload with at least one model under 'models', got none")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in sorted(models.items(), key=lambda kv: kv[1]["worst"]):
        xs = sorted(int(n) for n in entry["ratio"])
        ax.plot(
            xs,
            [entry["ratio"][n] if n in entry["ratio"] else entry["ratio"][str(n)] for n in xs],
            marker="o",
            label=f"{name} (worst {entry['worst']:.2f})",
        )
    ax.axhline(1.0, color="grey", linewidth=1)
    lengths = sorted({int(n) for e in models.values() for n in e["ratio"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45 if len(lengths) > 6 else 0)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity / best model's")
    ax.set_title(title or "Ratio to the best model at each length (1 = best)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def _heatmaps(panels: dict, out: str | Path, *, xlabel: str, ylabel: str, title: str, label: str) -> Path:
    """One annotated heatmap per panel: {title: (row labels, column labels, values [row][column])}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 3.6 * len(panels), 3.6), squeeze=False)
    image = None
    for ax, (name, (rows, columns, values)) in zip(axes[0], panels.items()):
        image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(columns)), columns, rotation=45, fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel(ylabel)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label=label)
    fig.suptitle(title)
    return _save(fig, out)


def plot_retrieval(payload: dict, out: str | Path, *, title: str | None = None) -> Path:
    """Accuracy heatmaps (depth x length), one panel per model, each cell annotated."""
    models = payload.get("models") or {}
    if not models:
        raise ValueError("plot_retrieval needs a payload with at least one model under 'models', got none")
    panels = {}
    for name, entry in models.items():
        lengths = sorted(entry["grid"], key=int)
        depths = sorted({float(d) for row in entry["grid"].values() for d in row})
        acc = [[_cell(entry["grid"][n], d) for n in lengths] for d in depths]  # [depth, length]
        panels[f"{name} (mean {entry.get('mean', 0):.0%})"] = (
            [f"{d:.0%}" for d in depths],
            [str(n) for n in lengths],
            acc,
        )
    return _heatmaps(
        panels,
        out,
        xlabel="prompt length (tokens)",
        ylabel="key depth",
        label="accuracy",
        title=title or f"{payload.get('task', 'retrieval')} accuracy",
    )


def plot_ruler(payload: dict, out: str | Path, *, title: str | None = None) -> Path:
    """RULER score heatmaps (task x length, and the mean over tasks), one panel per model."""
    models = payload.get("models") or {}
    if not models:
        raise ValueError("plot_ruler needs a payload with at least one model under 'models', got none")
    panels = {}
    for name, entry in models.items():
        tasks = list(entry["results"])
        lengths = sorted({int(n) for cells in entry["results"].values() for n in cells})

        def score(cells: dict, n: int) -> float:
            cell = cells.get(n, cells.get(str(n)))
            return float("nan") if cell is None or cell["score"] is None else float(cell["score"])

        values = [[score(entry["results"][t], n) for n in lengths] for t in tasks]  # [task, length]
        values.append([score(entry["mean"], n) for n in lengths])
        panels[name] = ([*tasks, "mean"], [str(n) for n in lengths], values)
    samples = (payload.get("config") or {}).get("samples", "?")
    return _heatmaps(
        panels,
        out,
        xlabel="sequence length (tokens)",
        ylabel="task",
        label="score",
        title=title or f"RULER through lm-eval ({samples} samples a cell)",
    )


def _cell(row: dict, depth: float) -> float:
    for d, v in row.items():
        if abs(float(d) - depth) < 1e-12:
            return float(v)
    return float("nan")


def _rope_config(model: nn.Module | None, rotary) -> object:
    """A plain-RoPE transformers config matching the rotary: a copy of the model's, or a minimal LLaMA one."""
    if model is not None and getattr(model, "config", None) is not None:
        from ..hf.lookup import text_config

        return copy.deepcopy(text_config(model))
    from transformers import LlamaConfig

    d = 2 * rotary.inv_freq.numel()
    base = float(rotary.inv_freq[1].double() ** (-d / 2))  # θ⁰_1 = base^(-2/d)
    return LlamaConfig(
        hidden_size=d,
        head_dim=d,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=rotary.original_length,
        rope_parameters={"rope_type": "default", "rope_theta": base},
    )


def baseline_inv_freqs(config, t: float, length: int) -> dict[str, torch.Tensor]:
    """θ(t) of PI, NTK (α = t), YaRN and the CLEX prior (NTK, α = 2t − 1), by ROPE_INIT_FUNCTIONS.

    config: a plain-RoPE transformers config (copied, never changed); length: L.  -> {name: [d/2] float32}
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    plain = {**(config.rope_parameters or {}), "rope_type": "default"}
    plan = {
        "PI": ("linear", {"factor": t}, None),
        "NTK": ("dynamic", {"factor": 1.0}, t * length),  # base·(seq_len/L)^(d/(d-2)): static NTK, α = t
        "YaRN": ("yarn", {"factor": t, "original_max_position_embeddings": length}, None),
        "CLEX prior (NTK α=2t-1)": ("dynamic", {"factor": 2.0}, t * length),  # α = 2·seq_len/L − 1
    }
    out = {}
    for name, (rope_type, params, seq_len) in plan.items():
        cfg = copy.deepcopy(config)
        cfg.rope_parameters = {**plain, "rope_type": rope_type, **params}
        out[name] = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)[0].float()
    return out


def plot_freqs(
    model: str | Path | nn.Module,
    *,
    ts: Sequence[float] | str = (1, 2, 4, 8, 16),
    out_dir: str | Path = "runs/plots",
    name: str = "freqs",
    overwrite: bool = False,
) -> dict:
    """Plot the learned frequencies θ(t) of a CLEX model beside PI, NTK and YaRN for the same t.

    Top row: θ_j(t) / θ⁰_j per pair. Bottom row: each pair's largest angle at L·t tokens against the largest
    it saw in pre-training, t·θ_j(t) / θ⁰_j; above 1 for a pair that never completed a turn in L (shaded) is
    an angle the model never saw — where a far-end breakdown comes from. Writes ``<out_dir>/<name>.png`` and
    the numbers beside it (``<name>.json``: ``never_turned`` and each curve's ``angle_ratio``). Returns them.

    Args:
        model: a CLEX model folder (in Python also a CLEX model or its CLEXRotaryEmbedding)
        ts: length factors t >= 1, one panel each, e.g. 1 2 4 8
        out_dir: folder of the figure <name>.png and its numbers <name>.json
        name: file stem of the figure and its numbers (a plain name: nothing is written outside out_dir)
        overwrite: replace an earlier figure of the same out_dir and name (else refused); other files stay
    """
    from ..core.checks import check_fits, solve_bytes
    from ..core.rotary_embedding import CLEXRotaryEmbedding
    from ..hf.loading import load_model
    from .report import check_results, result_files

    check_results(out_dir, name, overwrite=overwrite)
    try:
        ts = [float(t) for t in (ts.split(",") if isinstance(ts, str) else ts)]
    except (TypeError, ValueError):
        raise ValueError(f"ts must be length factors >= 1 like '1,2,4,8', got {ts!r}") from None
    if not ts or not all(math.isfinite(t) and t >= 1 for t in ts):
        raise ValueError(f"ts must be finite length factors >= 1 like '1,2,4,8', got {ts!r}")
    owner = None
    if isinstance(model, CLEXRotaryEmbedding):
        rotary = model
    else:
        owner = model if isinstance(model, nn.Module) else load_model(str(model))
        from .specs import rotary_of

        rotary = rotary_of(owner)
        if not isinstance(rotary, CLEXRotaryEmbedding):
            what = type(model).__name__ if owner is model else str(model)
            raise ValueError(f"plot freqs needs a CLEX model (rope_type 'clex'), but {what} has no CLEX rotary")
    # each panel solves θ(t) on the rotary's step from 1 to t: refuse a t whose solve cannot fit in memory
    check_fits("ts", max(ts), solve_bytes(math.ceil(max(ts) / rotary.config.time_dt), rotary.inv_freq.numel()))
    config, length = _rope_config(owner, rotary), rotary.original_length
    theta0 = rotary.inv_freq.float().cpu()
    never = (length * theta0 < 2 * math.pi).tolist()  # pairs that never completed a turn in L
    numbers = {"original_length": length, "theta0": theta0.tolist(), "never_turned": never, "t": {}, "angle_ratio": {}}
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(ts), figsize=(3.3 * len(ts), 6.4), squeeze=False, sharey="row")
    for ax, low, t in zip(axes[0], axes[1], ts):
        with torch.no_grad():
            curves = {"CLEX (learned)": rotary.inv_freq_at(t).float().cpu(), **baseline_inv_freqs(config, t, length)}
        numbers["t"][f"{t:g}"] = {k: v.tolist() for k, v in curves.items()}
        for label, theta in curves.items():
            style = {"linewidth": 2.2} if label.startswith("CLEX (") else {"linewidth": 1.2, "zorder": 3}
            if "prior" in label:
                style.update(color="black", linestyle=":")
            ax.plot(range(theta.numel()), (theta / theta0).numpy(), label=label, **style)
            low.plot(range(theta.numel()), (t * theta / theta0).numpy(), **style)
        numbers["angle_ratio"][f"{t:g}"] = {k: (t * v / theta0).tolist() for k, v in curves.items()}
        first = never.index(True) if True in never else len(never)
        low.axvspan(first - 0.5, len(never) - 0.5, color="grey", alpha=0.15)
        low.axhline(1.0, color="red", linewidth=0.8)
        low.set(yscale="log", xlabel="frequency pair j")
        low.grid(True, which="both", alpha=0.3)
        ax.set_yscale("log")
        ax.set_title(f"t = {t:g} ({t * length:g} tokens)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("θ_j(t) / θ_j(1)")
    axes[1][0].set_ylabel("largest angle / pre-training's\n(shaded: pairs that never turned in L)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"CLEX frequencies against PI, NTK and YaRN (L = {length})")
    png = _save(fig, Path(out_dir) / f"{name}.png")
    data = atomic_write_text(Path(out_dir) / f"{name}.json", json.dumps(numbers, indent=1) + "\n")
    for file in result_files(out_dir, name):  # what is left of an earlier result replaced (overwrite)
        if file not in (png, data) and file.is_file():
            file.unlink()
    return {**numbers, "paths": {"png": str(png), "json": str(data)}}
