"""The CLEX recipes: named, measured settings of CLEX and of its fine-tuning, each held here once.

    import clex.recipes
    clex.recipes.names()                                        # ('paper', 'recommended', 'far')
    far = clex.recipes.get("far")                               # help(far) / far.__doc__: when to use it, what it did
    model = clex.apply_clex(model, far.clex_config())           # CLEXConfig(max_factor=16, prior="yarn", ...)
    config = TrainConfig(**far.train_fields(model="my/folder", steps=200))

A recipe is the CLEX dynamics and t sampler (:class:`clex.CLEXConfig` fields: ``clex``) and the training fields
it was measured with (:class:`clex.TrainConfig`'s ``factor`` = CLEX's ``max_factor``, and ``pose``). A training
file names one with ``recipe: far``: :meth:`TrainConfig.from_dict` puts the recipe's fields under the file's, so
every key the file gives explicitly wins (``recipes/smollm2-clex-far.yaml`` is ``recipe: far`` plus the budget).

The figures in the docstrings: SmolLM2-135M-Instruct (L = 8192) fine-tuned on one H200, 200 steps x 2 rows x
8192 tokens of the embedded plays, LoRA r8, bf16; perplexity of the four held-out plays (chunked, two windows per
length), mean of 3 seeds where it says so (``experiments/past-4x/``); and the byte-level miniature of ``clex demo``
(L = 128, 3 seeds, ``experiments/miniature/``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.config import CLEXConfig

#: The CLEXConfig fields every recipe states (the same keys in each, so that recipes compare field by field).
RECIPE_FIELDS = ("prior", "mscale", "log_scale", "angle_cap", "past_max", "train_t", "position_span")


@dataclass(frozen=True)
class Recipe:
    """A named CLEX recipe: CLEXConfig fields, the training fields it was measured with, and what it did."""

    name: str
    clex: MappingProxyType  # CLEXConfig fields (RECIPE_FIELDS)
    factor: float  # max_factor = TrainConfig.factor: t is drawn from 1..factor in training
    pose: bool  # PoSE positions in training (CLEXConfig.position_sampler="pose")
    doc: str = field(repr=False, compare=False)  # when to use it and what it was measured to do

    def __post_init__(self):
        object.__setattr__(self, "clex", MappingProxyType(dict(self.clex)))
        object.__setattr__(self, "__doc__", self.doc)  # help(recipe), inspect.getdoc(recipe)

    def clex_config(self, **overrides: Any) -> CLEXConfig:
        """The recipe's :class:`CLEXConfig` (max_factor = the recipe's factor), ``overrides`` on top, e.g.
        ``get("far").clex_config(max_factor=8)``; an unknown field is refused with the valid ones."""
        from .core.config import CLEXConfig

        fields = {"max_factor": self.factor, **self.clex}
        if self.pose:
            fields["position_sampler"] = "pose"
        return CLEXConfig.from_dict({**fields, **overrides})

    def train_fields(self, **overrides: Any) -> dict:
        """TrainConfig fields of a CLEX fine-tune with this recipe: ``recipe``, ``method``, ``factor``, ``pose``
        and ``clex``, with ``overrides`` on top (any TrainConfig field; a ``clex`` mapping is merged key by key):
        ``TrainConfig(**get("far").train_fields(steps=200, clex={"max_factor": 8}))``."""
        explicit = dict(overrides)
        clex = {**self.clex, **(explicit.pop("clex", None) or {})}
        return {
            "recipe": self.name,
            "method": "clex",
            "factor": self.factor,
            "pose": self.pose,
            **explicit,
            "clex": clex,
        }


PAPER = Recipe(
    "paper",
    {
        "prior": "ntk",
        "mscale": "none",
        "log_scale": False,
        "angle_cap": False,
        "past_max": "ode",
        "train_t": "integer",
        "position_span": "sequence",
    },
    factor=16,
    pose=False,
    doc="""The paper's CLEX (Chen et al., ICLR 2024): the NTK prior (α = 2t − 1), t ~ U{1..16}, the paper's random
    extrapolated positions; CLEXConfig's defaults. Use it to reproduce the paper or to continue training its
    released checkpoints.

    Measured on SmolLM2-135M (with PoSE positions and max_factor 8, as ``recipes/smollm2-clex.yaml``; one seed;
    ``experiments/past-4x/options``): 8k / 16k / 32k / 64k / 128k perplexity 31.8 / 29.2 / 29.9 / 44.1 / 318,
    against YaRN s=8's 32.3 / 29.5 / 30.4 / 29.4 / 67.5: level below 4x, then it breaks — the learned θ(t) turns
    pairs that never completed a turn in L past the angles pre-training showed, and past max_factor the network
    is integrated where it was never trained (its untrained prior: 48.8 at 64k, 83.6 at 128k). The
    ``recommended`` recipe removes both. In the miniature (``clex demo``, trained at L as the paper's CLEX-4K,
    3 seeds, ``experiments/miniature/pose-seeds``): 5.88 / 7.16 / 8.34 at 1x / 8x / 16x L.
    """,
)

RECOMMENDED = Recipe(
    "recommended",
    {
        "prior": "yarn",
        "mscale": "yarn",
        "log_scale": False,
        "angle_cap": True,
        "past_max": "prior",
        "train_t": "integer",
        "position_span": "original",
    },
    factor=8,
    pose=True,
    doc="""CLEX up to 4x: use it for targets up to 4x the original length (trained to 8x). YaRN's NTK-by-parts as
    the prior the ODE learns a residual of, YaRN's attention temperature, the angle cap (pairs that never turned
    in L keep their pre-training angles), the prior's shape past max_factor (the learned residual held),
    t ~ U{1..8}, PoSE positions spanning L·t.

    Measured on SmolLM2-135M (3 seeds, ``experiments/past-4x/options`` and ``experiments/past-4x/t-squared-seeds``):
    8k / 16k / 32k perplexity 31.9 / 28.9 / 29.4, below YaRN s=8 (32.3 / 29.5 / 30.4) and s=16 (33.9 / 32.0 / 33.2)
    on the plays and on the King James Bible with every seed; 64k 32.9 against YaRN s=8's 29.4 (+12%; the paper's
    dynamics +50%); 128k 59.5, below YaRN s=8 (67.5), not below YaRN s=16 (40.4). Past 4x use ``far``.
    """,
)

FAR = Recipe(
    "far",
    {
        "prior": "yarn",
        "mscale": "none",
        "log_scale": True,
        "angle_cap": True,
        "past_max": "prior",
        "train_t": "integer-quadratic",
        "position_span": "original",
    },
    factor=16,
    pose=True,
    doc="""CLEX past 4x: use it for one model over every length up to 16x the original one. The recommended
    dynamics with t drawn P(t) ∝ t² on 1..16 (each t gets steps in proportion to its window's query-key pairs)
    and the log-length query scale (q·k × log(n)/log(L) past L, as the released CLEX-7B-16K) in place of YaRN's
    temperature.

    Measured on SmolLM2-135M (3 seeds, ``experiments/past-4x/far-recipe-seeds``): 8k / 16k / 32k / 64k / 128k
    perplexity 32.6 / 29.2 / 28.7 / 29.8 / 50.0 against the recommended recipe's 31.9 / 28.9 / 29.4 / 32.9 / 59.5
    (+2% at 8k, lower from 32k on), YaRN s=8's 32.3 / 29.5 / 30.4 / 29.4 / 67.5 (level at 64k, seeds 28.6–31.7)
    and YaRN s=16's 33.9 / 32.0 / 33.2 / 35.4 / 40.4. Its seeds spread more than YaRN's past 4x (128k 41.6–61.1).
    In the miniature (``clex demo``, 3 seeds, ``experiments/miniature/far-recipe-seeds``) trained at 4x L it is
    the best model at 16x L (5.58 against YaRN s=8's 10.95) and at most 7.3% above the best one at any length.

    Trained with the ODE weights frozen (``clex_lr=0``: θ(t) stays the prior's, the LoRA learns every t; 3 seeds,
    ``experiments/one-model-every-length``), its worst ratio to the best trained model over 8k–128k falls from
    1.23 / 1.43 to 1.11 / 1.14 (plays / King James Bible) at the same place from 8k to 64k: the learned residual
    of θ(16) was what cost most at 128k. Its training step is 1.01–1.03x plain RoPE's against 1.00–1.08x.
    """,
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (PAPER, RECOMMENDED, FAR)}


def names() -> tuple[str, ...]:
    """The recipe names, e.g. for a CLI's choices."""
    return tuple(RECIPES)


def get(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name is refused with the closest one and every valid one."""
    if name in RECIPES:
        return RECIPES[name]
    close = difflib.get_close_matches(str(name), list(RECIPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {name!r}{hint}")


__all__ = ["FAR", "PAPER", "RECIPES", "RECOMMENDED", "Recipe", "get", "names"]
