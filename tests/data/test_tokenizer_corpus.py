"""The byte tokenizer and the embedded corpus."""

from transformers import AutoTokenizer

from clex.data.corpus import HELD_OUT, clean_markdown, split_plays
from clex.data.tokenizer import byte_tokenizer


def test_byte_tokenizer_ids_are_the_utf8_bytes_and_it_round_trips(tmp_path):
    text = "Hello, world!\n  À bientôt — ✓\t\x00"
    tok = byte_tokenizer()
    assert tok(text)["input_ids"] == list(text.encode()) and tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id == 256 and len(tok) == 257
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == list(text.encode())


def test_corpus_holds_out_whole_plays():
    train, held = split_plays()
    assert set(held) == set(HELD_OUT) and not set(train) & set(held) and len(train) + len(held) == 38
    assert all(len(v) > 90_000 for v in held.values()) and "**" not in held["hamlet"]


def test_markdown_is_stripped():
    assert (
        clean_markdown("## ACT I\n\n**HAMLET**  \n_Enter ghost_\nTo be\n\n\n\nor not")
        == "ACT I\n\nHAMLET\nEnter ghost\nTo be\n\nor not\n"
    )
