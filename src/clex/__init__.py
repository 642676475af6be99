"""clex: CLEX (Continuous Length EXtrapolation, Chen et al., ICLR 2024) for any RoPE model of transformers.

    import clex
    model = clex.apply_clex(model, clex.CLEXConfig(max_factor=16))   # learned, continuous RoPE scaling
    model.save_pretrained("out");  model = clex.load_model("out")

Pipelines (imported on first use): clex.finetune(TrainConfig), clex.run_ppl, clex.run_passkey, clex.run_needle,
clex.plot_freqs, clex.run_demo, clex.load_smollm2.
"""

from importlib import import_module

from .checkpoint import load_model
from .config import CLEXConfig
from .patch import apply_clex, get_clex_rotary
from .rotary import CLEXDynamics, CLEXRotaryEmbedding

__version__ = "0.1.0"

#: pipeline entry points, imported lazily so that `import clex` stays light
_LAZY = {
    "TrainConfig": "train_config",
    "finetune": ("train", "run"),
    "run_ppl": "evaluate",
    "run_passkey": "retrieval",
    "run_needle": "retrieval",
    "plot_freqs": "plot",
    "run_demo": ("demo", "run"),
    "load_smollm2": "smollm2",
    "enable_exact_cache": "generation",
    "disable_exact_cache": "generation",
    "generate_fixed_t": "generation",
    "fixed_t_for": "generation",
    "ModelSpec": "evalkit",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'clex' has no attribute {name!r}")
    module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
    return getattr(import_module(f"clex.{module}"), attr)


__all__ = ["CLEXConfig", "CLEXDynamics", "CLEXRotaryEmbedding", "apply_clex", "get_clex_rotary", "load_model",
           "__version__", *_LAZY]  # fmt: skip
