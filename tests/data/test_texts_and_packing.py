"""Loading, splitting and packing training text; the errors name the file."""

import json

import pytest
import torch

from clex.data.corpus import HELD_OUT, split_plays
from clex.data.texts import load_texts, split_documents
from clex.data.tokenizer import byte_tokenizer
from clex.train.packing import pack, prepare_data, rows_at


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_embedded_corpus_is_the_training_plays_only():
    texts = load_texts()
    train, held = split_plays()
    assert texts == list(train.values()) and load_texts("embedded") == texts
    assert not any(h in texts for h in held.values()) and len(texts) == len(train) and HELD_OUT


def test_every_source_kind(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta text")
    (tmp_path / "sub" / "c.jsonl").write_text(
        json.dumps({"body": "gamma"}) + "\n\n" + json.dumps({"body": "delta"}) + "\n"
    )
    (tmp_path / "skip.csv").write_text("x,y")
    (tmp_path / "empty.txt").write_text("  \n")
    assert load_texts(tmp_path / "a.txt") == ["alpha text"]
    assert load_texts(tmp_path / "sub" / "c.jsonl", text_field="body") == ["gamma", "delta"]
    # a folder: .txt/.md/.jsonl files, sorted by path, empty documents dropped, other files ignored
    assert load_texts(tmp_path, text_field="body") == ["alpha text", "beta text", "gamma", "delta"]


def test_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one doc", "two doc", ""], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_texts(tmp_path / "ds") == ["one doc", "two doc"]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    assert load_texts(str(tmp_path / "dd")) == ["one doc", "two doc"]
    with pytest.raises(ValueError, match="'body'.*text, n"):
        load_texts(tmp_path / "ds", text_field="body")


def test_bad_sources_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_texts(tmp_path / "nowhere.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    with pytest.raises(ValueError, match="bin.txt.*UTF-8"):
        load_texts(tmp_path / "bin.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"nofield\.jsonl:1 has no string field 'text'.*content"):
        load_texts(tmp_path / "nofield.jsonl")
    (tmp_path / "blank.md").write_text("\n\n")
    with pytest.raises(ValueError, match="blank.md holds no text"):
        load_texts(tmp_path / "blank.md")
    (tmp_path / "t.csv").write_text("a")
    with pytest.raises(ValueError, match=r"t\.csv.*\.txt, \.md, \.jsonl"):
        load_texts(tmp_path / "t.csv")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="none holds no .txt"):
        load_texts(tmp_path / "none")


def test_pack_joins_documents_with_eos_and_cuts_rows(tok):
    rows = pack(["abc", "de", "fghij"], tok, 4)  # a b c <eos> d e <eos> f g h i j <eos>: 13 tokens -> 3 rows
    eos = tok.eos_token_id
    assert rows.shape == (3, 4) and rows.dtype == torch.long
    assert rows.flatten().tolist() == [*b"abc", eos, *b"de", eos, *b"fghij"]
    with pytest.raises(ValueError, match=r"the held-out part give 3 tokens, fewer than one row of seq_len=8"):
        pack(["ab"], tok, 8, name="the held-out part")


def test_prepare_data_errors_name_the_source(tmp_path, tok):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match=r"short\.txt.*seq_len=64"):
        prepare_data(tmp_path / "short.txt", tok, 64, held_out=0)
    (tmp_path / "d").mkdir()
    for i in range(4):
        (tmp_path / "d" / f"{i}.txt").write_text("x" * 10)
    with pytest.raises(ValueError, match=r"held-out documents of .*d \(held_out=0.25\) give 11 tokens.*seq_len=16"):
        prepare_data(tmp_path / "d", tok, 16, held_out=0.25, seed=0)
    train, held = prepare_data(tmp_path / "d", tok, 16, held_out=0)
    assert train.shape == (2, 16) and held is None  # 4 x (10 + EOS) = 44 tokens


def test_held_out_split_is_seeded_and_disjoint():
    docs = [f"doc {i}" for i in range(40)]
    train, held = split_documents(docs, 0.1, seed=1)
    assert len(held) == 4 and sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert split_documents(docs, 0.1, seed=1) == (train, held)
    assert split_documents(docs, 0.1, seed=2)[1] != held
    assert split_documents(docs, 0.0) == (docs, [])
    assert split_documents(["0123456789"], 0.2) == (["01234567"], ["89"])  # one document: its tail
    with pytest.raises(ValueError, match="held_out"):
        split_documents(docs, 1.5)


def test_row_stream_is_resumable_and_covers_each_epoch():
    rows = torch.arange(10).unsqueeze(1)  # [10, 1]
    stream = rows_at(rows, 0, 25, seed=3).flatten().tolist()
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new shuffle every epoch
    assert rows_at(rows, 7, 11, seed=3).flatten().tolist() == stream[7:18]  # any position continues exactly
    assert rows_at(rows, 0, 10, seed=4).flatten().tolist() != stream[:10]
