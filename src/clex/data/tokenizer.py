"""A byte-level tokenizer for the miniature models: 256 byte tokens + <eos>, as a transformers fast tokenizer.

It saves and loads like any tokenizer (``tokenizer.json``, read by ``AutoTokenizer`` offline), so a tiny model
folder is self-contained. Every UTF-8 text round-trips exactly.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

EOS = "<eos>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """ids 0..255 are the bytes 0..255 (in the GPT-2 printable-byte alphabet); id 256 is <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    byte_to_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=_byte_of))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def _byte_of(char: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's bytes_to_unicode, inverted)."""
    code = ord(char)
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
