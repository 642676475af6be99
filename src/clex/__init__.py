"""clex: CLEX (Continuous Length EXtrapolation, Chen et al., ICLR 2024) for any RoPE model of transformers.

    import clex
    model = clex.apply_clex(model, clex.CLEXConfig(max_factor=16))   # learned, continuous RoPE scaling
    model.save_pretrained("out");  model = clex.load_model("out")

Pipelines (imported on first use): clex.finetune(config, **fields), clex.run_ppl, clex.run_passkey,
clex.run_needle, clex.plot_freqs, clex.export, clex.run_demo, clex.load_smollm2. The named recipes:
clex.recipes.get("recommended" | "far" | "paper").
"""

from importlib import import_module
from typing import TYPE_CHECKING

from . import recipes
from ._version import __version__

#: the public API, each name imported from its module on first use, so that `import clex` loads neither torch
#: nor transformers and changes nothing in them
_LAZY = {
    "CLEXConfig": "core.config",
    "CLEXDynamics": "core.rotary_embedding",
    "CLEXRotaryEmbedding": "core.rotary_embedding",
    "apply_clex": "hf.patch",
    "get_clex_rotary": "hf.lookup",
    "load_model": "hf.loading",
    "enable_exact_cache": "hf.generation",
    "disable_exact_cache": "hf.generation",
    "generate_fixed_t": "hf.generation",
    "fixed_t_for": "hf.generation",
    "export": "hf.export",
    "load_smollm2": "data.smollm2",
    "TrainConfig": "train.config",
    "finetune": "train.loop",
    "ModelSpec": "eval.specs",
    "run_ppl": "eval.perplexity",
    "run_passkey": "eval.retrieval",
    "run_needle": "eval.retrieval",
    "plot_freqs": "eval.plot",
    "run_demo": ("demo", "run"),
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily (__getattr__)
    from .core.config import CLEXConfig as CLEXConfig
    from .core.rotary_embedding import CLEXDynamics as CLEXDynamics
    from .core.rotary_embedding import CLEXRotaryEmbedding as CLEXRotaryEmbedding
    from .data.smollm2 import load_smollm2 as load_smollm2
    from .demo import run as run_demo  # noqa: F401 (exported by __all__)
    from .eval.perplexity import run_ppl as run_ppl
    from .eval.plot import plot_freqs as plot_freqs
    from .eval.retrieval import run_needle as run_needle
    from .eval.retrieval import run_passkey as run_passkey
    from .eval.specs import ModelSpec as ModelSpec
    from .hf.export import export as export
    from .hf.generation import (
        disable_exact_cache as disable_exact_cache,
    )
    from .hf.generation import (
        enable_exact_cache as enable_exact_cache,
    )
    from .hf.generation import (
        fixed_t_for as fixed_t_for,
    )
    from .hf.generation import (
        generate_fixed_t as generate_fixed_t,
    )
    from .hf.loading import load_model as load_model
    from .hf.lookup import get_clex_rotary as get_clex_rotary
    from .hf.patch import apply_clex as apply_clex
    from .train.config import TrainConfig as TrainConfig
    from .train.loop import finetune as finetune


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'clex' has no attribute {name!r}")
    module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
    value = getattr(import_module(f"clex.{module}"), attr)
    globals()[name] = value  # once loaded, an ordinary attribute (help(clex) documents it)
    return value


def __dir__():
    """The public API with the module's own names: what ``dir(clex)`` and tab completion list."""
    return sorted({*(n for n in globals() if n.startswith("__") and n.endswith("__")), *__all__})


__all__ = ["__version__", "recipes", *_LAZY]
