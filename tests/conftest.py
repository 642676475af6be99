"""Tiny random models of every RoPE family we support, built from configs (no hub, no download); fixtures
the training tests share."""

import pytest
import torch

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)

FAMILIES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "phi3": (
        "Phi3Config",
        dict(num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.5)),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)),
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM of ``family`` in eval mode, float32, with eager-equivalent sdpa attention."""
    import transformers

    name, extra = FAMILIES[family]
    config = getattr(transformers, name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def llama():
    return tiny_model("llama")


# --- shared by the training tests (tests/train: `pytestmark = pytest.mark.usefixtures("one_thread")`) ---


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two contended cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Three short plays (20k characters each): enough rows for a few dozen steps, fast to pack."""
    from clex.data.corpus import split_plays

    folder = tmp_path_factory.mktemp("texts")
    for name, text in list(split_plays()[0].items())[:3]:
        (folder / f"{name}.txt").write_text(text[:20_000])
    return folder


def tiny_tokenizer(folder, vocab_size: int = 300):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens (ids 0, 1 = <s>, </s>) saved into ``folder`` (tokenizer.json
    and tokenizer_config.json), trained on a few lines of text: for exports that need a real vocabulary (GGUF, vLLM)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast
