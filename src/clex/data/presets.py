"""Model presets: miniature RoPE models built from a config (no hub, no download), and local folders.

Each preset is a plain dict of ``transformers.LlamaConfig`` fields. They pair with the byte tokenizer
(:func:`clex.data.tokenizer.byte_tokenizer`: 256 bytes + <eos> = 257 ids) and have L = max_position_embeddings
small enough that "train short, test long" (1x .. 16x L) runs on a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import byte_tokenizer

_BYTE_VOCAB = dict(vocab_size=257, bos_token_id=None, eos_token_id=256, pad_token_id=256)

#: name -> LlamaConfig fields. Parameter counts are for the untied embeddings shown.
MODEL_PRESETS: dict[str, dict] = {
    # ~0.1M parameters, L = 32, head_dim 16: for tests (a step takes milliseconds).
    "micro-llama": dict(
        _BYTE_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    # ~0.9M parameters, L = 128: the tiny recipes; a 2-core CPU trains it in minutes.
    "tiny-llama": dict(
        _BYTE_VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    # ~3.3M parameters, L = 128: the scale of the trial in the notes (head_dim 32, like tiny-llama).
    "small-llama": dict(
        _BYTE_VOCAB,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preset_config(name: str):
    """The ``LlamaConfig`` of a preset; ValueError listing the presets for an unknown name."""
    from transformers import LlamaConfig

    if name not in MODEL_PRESETS:
        raise ValueError(
            f"unknown model preset {name!r}; presets: {', '.join(MODEL_PRESETS)} (or a local model folder)"
        )
    return LlamaConfig(**MODEL_PRESETS[name])


def build_model(preset_or_path: str | Path = "tiny-llama", *, seed: int = 0, dtype: str = "float32"):
    """Build a model and its tokenizer: a preset name gives a random-init LlamaForCausalLM + byte tokenizer;
    a local folder loads with :func:`clex.load_model` (CLEX folders too) and ``AutoTokenizer``.

    Returns (model in train mode, tokenizer). ``dtype``: float32 | bfloat16 | float16.
    """
    from transformers import LlamaForCausalLM

    from ..hf.loading import load_model, load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    name = str(preset_or_path)
    if name in MODEL_PRESETS:
        config = preset_config(name)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(DTYPES[dtype])
        return model.train(), byte_tokenizer()
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {name!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing local folder"
        )
    model = load_model(path, dtype=DTYPES[dtype])  # clear errors for a folder without config.json; no code runs
    tokenizer = load_tokenizer(path)  # trust_remote_code=False, a folder asking for custom code refused
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no eos_token: packing needs one to separate documents")
    return model.train(), tokenizer


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
