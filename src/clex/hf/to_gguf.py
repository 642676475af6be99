"""Exporting a CLEX model to a LLaMA-family GGUF for llama.cpp (and what builds on it: Ollama, llama-cpp-python).

At a fixed length factor t, CLEX is a set of RoPE frequencies θ(t). llama.cpp's LLaMA graph
(``src/models/llama.cpp``, ``src/llama-model.cpp`` of the llama.cpp that llama-cpp-python 0.3.36 vendors)
loads an optional per-pair tensor ``rope_freqs.weight`` (n_rot/2 float32 values, the tensor llama.cpp's own
converter writes for Llama 3.1) and passes it as ``freq_factors`` to ``ggml_rope_ext``; the CPU kernel
(``ggml/src/ggml-cpu/ops.cpp``, ``ggml_rope_cache_init``) rotates pair j at position p by
p · base^(-2j/n_rot) / freq_factors[j], and multiplies cos and sin by ``attn_factor``. Unlike transformers'
``longrope`` (short factors up to L, long ones past it, chosen per forward) the factors are used at EVERY
position: ``llama_model::get_rope_factors`` returns ``rope_freqs`` whenever the file has it (only a file whose
``rope.scaling.type`` is ``longrope`` gets the short/long pair, picked by the context size ``n_ctx``, not by
position). So the file written here is CLEX at t = N/L everywhere, short prompts included — exactly
:func:`clex.hf.generation.fixed_t` at N/L, the semantics of :func:`clex.generate_fixed_t` for a generation
that ends at N:

    rope_freqs_j = θ⁰_j / θ_j(N/L)      (the longrope export's long_factor)
    llama.rope.scaling.attn_factor = sqrt(the rotary's query scale at N: YaRN's or the learned temperature,
                                          the log scale of N)   (1 without any)
    weights: the t-conditioned adapters merged at N/L (clex.hf.t_adapter.fixed_t_state_dict)

The attention factor: ``llama_context`` sets ``cparams.yarn_attn_factor`` (1 unless the rope scaling type is
``yarn``) and multiplies it by ``hparams.rope_attn_factor``, read from ``<arch>.rope.scaling.attn_factor``; the
product scales cos and sin, i.e. q·k by its square — the same place transformers' ``attention_factor`` acts.
The file's ``rope.scaling.type`` is ``none`` (no linear or YaRN scaling on top; ``yarn_ext_factor`` stays 0),
``context_length`` is N and ``rope.scaling.original_context_length`` is L.

Weights are written in float32 (quantise with ``llama-quantize`` if wanted); Q and K rows are permuted from
transformers' half-split rotary layout to llama.cpp's interleaved pairs (rope type NORM for ``llama``). The
tokenizer comes from the model folder's ``tokenizer.json`` (BPE: tokens, merges, token types, special ids,
``add_bos_token`` and the chat template from ``tokenizer_config.json``); ``tokenizer_pre`` names llama.cpp's
pre-tokenizer (``tokenizer.ggml.pre``: ``smollm`` for SmolLM2, ``llama-bpe`` for Llama 3; ``default`` is
llama.cpp's generic GPT-2 regex). What the format cannot hold is refused: a family other than LLaMA/Mistral,
partial rotary, biases, Mistral's sliding window and N < L.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from ..core.io import temporary_sibling
from .lookup import text_config
from .t_adapter import fixed_t_state_dict

#: model_type -> GGUF architecture this writer maps.
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
#: The pre-tokenizer names (``tokenizer.ggml.pre``) llama.cpp's loader knows (``llama_vocab::impl::load`` in
#: ``src/llama-vocab.cpp``, late 2026; an older llama.cpp may lack the newest): any other name is refused
#: there at load time, so it is refused here at export time. ``smollm`` for SmolLM2, ``llama-bpe`` for Llama 3.
TokenizerPre = Literal[
    "default",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "smollm",
    "gpt-2",
    "tekken",
    "llama4",
    "gpt-4o",
    "qwen2",
    "qwen35",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "deepseek-r1-qwen",
    "falcon",
    "falcon3",
    "falcon-h1",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
    "stablelm2",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "poro-chat",
    "glm4",
    "chatglm-bpe",
    "viking",
    "jais",
    "jais-2",
    "codeshell",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "exaone4",
    "exaone-moe",
    "chameleon",
    "minerva-7b",
    "megrez",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "phi-2",
    "jina-es",
    "jina-de",
    "jina-v1-en",
    "jina-v2-es",
    "jina-v2-de",
    "jina-v2-code",
    "jina-v5-nano",
    "roberta-bpe",
    "modern-bert",
    "gigachat",
    "a.x-4.0",
    "mellum",
    "mellum2",
    "whitespace",
    "minicpm5",
    "spark2_5",
    "youtu",
    "gemma4",
    "granite-embed-multi-311m",
    "granite-embed-multi-97m",
    "granite-docling",
    "sarvam-moe",
    "kormo",
    "f2llmv2",
    "kanana2",
    "talkie",
    "tiny_aya",
    "cohere2moe",
    "superbpe",
    "trillion",
    "bailingmoe",
    "bailingmoe2",
    "llada-moe",
    "seed-coder",
    "hunyuan",
    "hunyuan-dense",
    "hy_v4",
    "joyai-llm",
    "kimi-k2",
    "ufakzeka",
    "grok-2",
    "afmoe",
    "laguna",
    "minimax-m2",
    "solar-open",
]
TOKENIZER_PRES: tuple[str, ...] = get_args(TokenizerPre)
# llama.cpp's token types (llama_token_type): NORMAL, CONTROL (special added tokens), USER_DEFINED, UNUSED.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def interleave_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q/K projection rows from transformers' half-split layout to llama.cpp's interleaved pairs.

    Per head, rows [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] become [x_0, y_0, x_1, y_1, ...]; weight [n_heads·d, in].
    """
    rows, cols = weight.shape
    d = rows // n_heads
    return weight.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)  # [h, d/2, 2, in] flat


def _gguf_tensors(model, config, t: float) -> dict[str, np.ndarray]:
    """The GGUF tensors (float32, transformers' [out, in] layout, which GGUFWriter stores as ggml's [in, out]) of
    the model at t: t-conditioned adapters merged, the ODE weights and the learned temperature left behind."""
    import gguf

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # gguf's own map of transformers' names to llama.cpp's LLaMA tensors (weights only: biases are not written)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = {}
    for name, value in fixed_t_state_dict(model, t).items():
        if tied and name == "lm_head.weight":  # tied = the embedding
            continue
        target = names.get_name(name, try_suffixes=(".weight",)) if name.endswith(".weight") else None
        if target is None:
            raise ValueError(
                f"the GGUF writer maps LLaMA's weights only; {name!r} has no GGUF tensor name "
                "(a bias, or a family it does not know)"
            )
        value = value.detach().to("cpu", torch.float32)
        if target.endswith((".attn_q.weight", ".attn_k.weight")):
            value = interleave_rotary_rows(value, heads if ".attn_q." in target else kv_heads)
        out[target] = value.contiguous().numpy()
    return out


def _check_family(model) -> None:
    config = text_config(model)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ValueError(
            f"format gguf maps the model families {', '.join(map(repr, ARCHITECTURES))}, got model_type "
            f"{kind!r}: export it with format='hf' (transformers' longrope, also read by vLLM)"
        )
    if getattr(config, "sliding_window", None):
        raise ValueError(
            f"format gguf: sliding_window={config.sliding_window} is not held by the LLaMA GGUF; use format='hf'"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"format gguf: {flag}=True is not written by this GGUF writer; use format='hf'")


def _special_id(name: str, tok_config: dict, vocab: dict, config) -> int | None:
    value = tok_config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str) and value in vocab:
        return vocab[value]
    value = getattr(config, f"{name}_id", None)
    return value if isinstance(value, int) else None


def _add_tokenizer(writer, folder: Path, config, pre: str) -> None:
    """Tokens, merges, token types and special ids of ``folder/tokenizer.json`` (a BPE tokenizer)."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ValueError(
            f"format gguf needs the model's tokenizer.json (llama.cpp reads the vocabulary from the "
            f"file), and {folder} has none: pass a folder with a BPE tokenizer.json"
        )
    raw = json.loads(file.read_text())
    kind = raw.get("model", {}).get("type")
    if kind != "BPE":
        raise ValueError(f"format gguf writes BPE tokenizers only, {file} holds a {kind!r} model")
    vocab = dict(raw["model"]["vocab"])
    added = {t["content"]: t for t in raw.get("added_tokens", [])}
    vocab.update({text: t["id"] for text, t in added.items()})
    size = int(config.vocab_size)
    if max(vocab.values()) >= size:
        raise ValueError(f"tokenizer.json has token id {max(vocab.values())}, the model's vocab_size is {size}")
    tokens, types = [f"[PAD{i}]" for i in range(size)], [_UNUSED] * size  # ids the tokenizer lacks stay unused
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (_CONTROL if added[text].get("special") else _USER_DEFINED) if text in added else _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"].get("merges", [])]
    tok_file = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("unk_token", writer.add_unk_token_id),
        ("pad_token", writer.add_pad_token_id),
    ):
        i = _special_id(name, tok_config, vocab, config)
        if i is not None:
            add(i)
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    template = folder / "chat_template.jinja"
    chat = template.read_text() if template.is_file() else tok_config.get("chat_template")
    if isinstance(chat, str):
        writer.add_chat_template(chat)


def check_tokenizer_pre(name) -> str:
    """``name`` if llama.cpp knows it as a pre-tokenizer (:data:`TOKENIZER_PRES`), else a ValueError naming the
    closest known name."""
    if name not in TOKENIZER_PRES:
        close = difflib.get_close_matches(str(name), TOKENIZER_PRES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"tokenizer_pre {name!r} is not a pre-tokenizer llama.cpp knows{hint}; e.g. smollm (SmolLM2), "
            f"llama-bpe (Llama 3), default; all: {', '.join(TOKENIZER_PRES)}"
        )
    return name


def write_gguf(
    model,
    out: Path,
    *,
    length: int,
    params: dict,
    note: dict,
    tokenizer_from: str | Path | None,
    tokenizer_pre: str = "default",
) -> Path:
    """Write ``out`` (a .gguf file, atomically) from a CLEX model at target ``length``; ``params`` are its
    :func:`clex.hf.export.longrope_parameters` (long_factor = θ⁰/θ(N/L), attention_factor)."""
    import gguf

    _check_family(model)
    config = text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    factors = np.asarray(params["long_factor"], dtype=np.float32)  # θ⁰/θ(N/L) per pair: [n_rot/2]
    if 2 * factors.size != head_dim:
        raise ValueError(
            f"format gguf: partial rotary (rotary dim {2 * factors.size} of head_dim {head_dim}) is not "
            "held by the LLaMA GGUF; use format='hf'"
        )
    base = params.get("rope_theta", getattr(config, "rope_theta", None))
    if base is None:
        raise ValueError("format gguf: the model's config has no rope_theta (the RoPE base llama.cpp needs)")
    if tokenizer_from is None:
        raise ValueError("format gguf needs the model's tokenizer: pass tokenizer_from (a folder with tokenizer.json)")
    check_tokenizer_pre(tokenizer_pre)
    if not 0 < int(length) < 2**32:
        raise ValueError(f"format gguf holds context lengths below 2^32 (a uint32), got length {length}")
    tensors = _gguf_tensors(model, config, length / int(params["original_max_position_embeddings"]))
    tmp = temporary_sibling(out)  # mode from the user's umask, like any file they write
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(note.get("name", "clex-export"))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(int(length))
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(config.num_key_value_heads or heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(base))
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        writer.add_rope_scaling_attn_factors(float(params["attention_factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_string("clex.export", json.dumps(note, sort_keys=True))
        _add_tokenizer(writer, Path(tokenizer_from), config, tokenizer_pre)
        writer.add_tensor("rope_freqs.weight", factors)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out
