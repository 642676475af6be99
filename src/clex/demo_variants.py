"""What `clex demo` fine-tunes (:data:`VARIANTS`) and how big the miniature is (:data:`SCALES`).

A variant is a CLEX recipe of :mod:`clex.recipes` (its fields resolved by TrainConfig, as a YAML file's
``recipe:`` is) or a baseline method, trained on rows of k·L tokens, with a few TrainConfig fields on top.
The names say what they are: ``clex-<recipe>-<k>x`` (``clex-<k>x``: the paper's recipe), ``<method><s>-<k>x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Variant:
    """One fine-tune of the demo: a recipe or a method, at rows of ``rows`` x L tokens."""

    rows: int  # k: trained on rows of k·L tokens (the batch keeps the token budget: rows per step // k)
    mirrors: str  # what it is, and the paper's row it mirrors
    recipe: str | None = None  # a name of clex.recipes: a CLEX variant
    method: str | None = None  # a name of clex.hf.methods: a baseline
    factor: float | None = None  # a baseline's scale s; for a recipe, an override of its max_factor
    fields: dict = field(default_factory=dict)  # more TrainConfig fields (``clex``: merged into the recipe's)

    def train_fields(self) -> dict:
        """The TrainConfig fields this variant sets (the demo adds the model, budget and schedule)."""
        own = {"recipe": self.recipe} if self.recipe else {"method": self.method}
        return {**own, **({"factor": self.factor} if self.factor is not None else {}), **self.fields}


#: The variants' names (the CLI's choices for --variants): the keys of VARIANTS, in its order.
VariantName = Literal[
    "clex-rec-4x",
    "clex-far-4x",
    "yarn8-4x",
    "yarn16-4x",
    "pi-4x",
    "clex-rec-1x",
    "clex-far-1x",
    "clex-far8-4x",
    "clex-rec-gaps-1x",
    "clex-rec-gaps-4x",
    "clex-rec-lin-4x",
    "clex-rec-quad-4x",
    "clex-1x",
    "clex-pose-1x",
    "clex-4x",
    "clex-4x-paper",
    "yarn4-4x",
    "ntk-4x",
    "naive-4x",
    "pose-pi-1x",
]

_GAPS = {"pose": False}  # the paper's random positions instead of the recipe's PoSE
VARIANTS: dict[str, Variant] = {
    # --- the default run: the two recipes against YaRN at two scales and PI, all trained at 4 L ---
    "clex-rec-4x": Variant(4, "CLEX-16K, the recommended recipe (max_factor 8)", recipe="recommended"),
    "clex-far-4x": Variant(4, "CLEX-16K, the far recipe (max_factor 16)", recipe="far"),
    "yarn8-4x": Variant(4, "YaRN s=8 at 4x (paper: YaRN s=32)", method="yarn", factor=8),
    "yarn16-4x": Variant(4, "YaRN s=16 at 4x, aimed at 16x", method="yarn", factor=16),
    "pi-4x": Variant(4, "PI s=4 at 4x (paper: PI 16k)", method="pi", factor=4),
    # --- the recipes trained at L, and their parts ---
    "clex-rec-1x": Variant(1, "CLEX-4K, the recommended recipe", recipe="recommended"),
    "clex-far-1x": Variant(1, "CLEX-4K, the far recipe", recipe="far"),
    "clex-far8-4x": Variant(4, "clex-far-4x with max_factor 8: P(t) ∝ t² on 1..8", recipe="far", factor=8),
    "clex-rec-gaps-1x": Variant(
        1, "CLEX-4K, recommended dynamics, random positions", recipe="recommended", fields=_GAPS
    ),
    "clex-rec-gaps-4x": Variant(
        4, "CLEX-16K, recommended dynamics, random positions", recipe="recommended", fields=_GAPS
    ),
    "clex-rec-lin-4x": Variant(
        4,
        "clex-rec-gaps-4x with P(t) ∝ t",
        recipe="recommended",
        fields={**_GAPS, "clex": {"train_t": "integer-linear"}},
    ),
    "clex-rec-quad-4x": Variant(
        4,
        "clex-rec-gaps-4x with P(t) ∝ t²",
        recipe="recommended",
        fields={**_GAPS, "clex": {"train_t": "integer-quadratic"}},
    ),
    # --- the paper's recipe (max_factor 16, the paper's random positions) ---
    "clex-1x": Variant(1, "CLEX-4K: the paper's recipe, trained at the original length", recipe="paper"),
    "clex-pose-1x": Variant(
        1, "CLEX-4K with PoSE positions instead of the paper's", recipe="paper", fields={"pose": True}
    ),
    "clex-4x": Variant(
        4,
        "CLEX-16K, the paper's dynamics (integer positions over L·t)",
        recipe="paper",
        fields={"clex": {"position_span": "original"}},
    ),
    "clex-4x-paper": Variant(4, "CLEX-16K with the paper's positions (divided by n // L)", recipe="paper"),
    # --- more baselines ---
    "yarn4-4x": Variant(4, "YaRN s=4 at 4x (paper: YaRN s=16)", method="yarn", factor=4),
    "ntk-4x": Variant(4, "static NTK-aware s=4 at 4x (paper: CodeLLaMA)", method="ntk", factor=4),
    "naive-4x": Variant(4, "plain RoPE fine-tuned at 4x", method="none", factor=4),
    "pose-pi-1x": Variant(1, "PoSE + PI s=4: L rows spanning 4x", method="pi", factor=4, fields={"pose": True}),
}

#: The scales' names (the CLI's choices for --scale): the keys of SCALES.
ScaleName = Literal["quick", "default", "large"]


@dataclass(frozen=True)
class DemoScale:
    """How big the miniature is. Token budget of each fine-tune = finetune_steps x finetune_rows x L."""

    preset: str  # a clex.data.presets model preset
    pretrain_steps: int
    pretrain_batch: int  # rows of L tokens
    pretrain_lr: float
    finetune_steps: int
    finetune_rows: int  # rows of L tokens per step (rows of k L tokens: finetune_rows // k)
    finetune_lr: float
    variants: tuple[str, ...]
    clex_lr: float = 2e-5  # lr of the CLEX ODE weights (the paper's lr; larger makes θ(t) jagged in short runs)
    lengths: tuple[int, ...] = (1, 2, 4, 8, 16)  # evaluation lengths, x L
    eval_samples: int = 4  # sequences per held-out play and length
    workers: int = 0  # fine-tunes at once, a process of one torch thread each (0: all of them; 1: one by one here)
    threads: int = 0  # torch threads of pre-training and evaluation (0: torch's default, one per core; 1 is faster
    # on a busy CPU, where a second thread waits for the first at every operation)


SCALES: dict[str, DemoScale] = {
    # CI smoke run: seconds of training, a minute or two in all; checks the plumbing, not the claim.
    "quick": DemoScale(
        "micro-llama",
        40,
        8,
        3e-3,
        8,
        8,
        1e-3,
        variants=("clex-rec-4x", "clex-far-4x", "yarn8-4x", "pi-4x"),
        lengths=(1, 2, 4),
        eval_samples=1,
        workers=2,
        threads=1,
    ),
    # The default: the recommended and far recipes against YaRN s=8, s=16 and PI (experiments/miniature/README.md:
    # ~9 min on 2 cores, measured from the CPU seconds of each stage).
    "default": DemoScale(
        "tiny-llama",
        800,
        16,
        2e-3,
        300,
        8,
        5e-4,
        variants=("clex-rec-4x", "clex-far-4x", "yarn8-4x", "yarn16-4x", "pi-4x"),
        threads=1,
    ),
    # A larger CPU (or a longer wait): a bigger model, longer training, every variant.
    "large": DemoScale(
        "small-llama", 4000, 32, 1e-3, 1000, 32, 3e-4, variants=tuple(VARIANTS), eval_samples=8, workers=4
    ),
}
