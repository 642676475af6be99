"""clex: CLEX (Continuous Length EXtrapolation, Chen et al., ICLR 2024) for any RoPE model of transformers.

    import clex
    model = clex.apply_clex(model, clex.CLEXConfig(max_factor=16))   # learned, continuous RoPE scaling
    model.save_pretrained("out");  model = clex.load_model("out")

Pipelines (imported on first use): clex.finetune(TrainConfig), clex.run_ppl, clex.run_passkey, clex.run_needle,
clex.plot_freqs, clex.run_demo, clex.load_smollm2.
"""

from importlib import import_module

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
    "export": ("hf.export", "export"),
    "load_smollm2": "data.smollm2",
    "TrainConfig": "train.config",
    "finetune": ("train.loop", "run"),
    "ModelSpec": "eval.specs",
    "run_ppl": "eval.perplexity",
    "run_passkey": "eval.retrieval",
    "run_needle": "eval.retrieval",
    "plot_freqs": "eval.plot",
    "run_demo": ("demo", "run"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'clex' has no attribute {name!r}")
    module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
    return getattr(import_module(f"clex.{module}"), attr)


__all__ = ["__version__", *_LAZY]
