"""Tests of launcher/data/: preparing token shards from text sources, and deterministic batches."""
import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.tokenizer import load_tokenizer
from launcher.data import (
    BUILTIN_PYDOC,
    DataArgs,
    DataSource,
    TokenBatches,
    ensure_prepared,
    load_manifest,
    prepare,
    token_dtype,
)
from launcher.data.tokenized import open_shard

SEQ = 16


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory):
    """The builtin corpus with a small trained tokenizer, shared by the tests (training is the slow part)."""
    d = tmp_path_factory.mktemp("pydoc")
    args = DataArgs(dir=str(d), vocab_size=512, seq_len=64)
    return args, prepare(args, progress=False)


def tokenizer_of(pydoc):
    return os.path.join(pydoc[0].dir, "tokenizer.json")


def shard_tokens(data_dir, shards, dtype="uint16"):
    return np.concatenate([np.asarray(open_shard(data_dir, s, dtype)) for s in shards])


def documents(n, make=lambda i: f"Document number {i} says hello to the world, and then some more words."):
    return [make(i) for i in range(n)]


# --------------------------------------------------------------------------------------------
# prepare


def test_pydoc_manifest_and_tokens(pydoc):
    from pydoc_data.topics import topics

    args, m = pydoc
    assert m == load_manifest(args.dir)
    assert m["tokenizer"] == {"file": "tokenizer.json", "kind": "huggingface"}
    assert m["vocab_size"] == 512 and m["dtype"] == "uint16" and m["seq_len"] == 64
    [src] = m["sources"]
    assert src["path"] == BUILTIN_PYDOC and src["documents"] == len([t for t in topics.values() if t.strip()])
    assert src["train_tokens"] > 50_000 and src["val_tokens"] >= 65
    for split in ("train", "val"):
        files = src[f"{split}_shards"]
        assert sum(s["tokens"] for s in files) == src[f"{split}_tokens"]
    # The train and held-out ranges together are each unit's token file, whole.
    unit_files = sorted({s["file"] for s in src["train_shards"] + src["val_shards"]})
    assert sum(os.path.getsize(os.path.join(args.dir, f)) for f in unit_files) == \
        2 * (src["train_tokens"] + src["val_tokens"])

    tok = load_tokenizer(args.dir)
    assert (tok.vocab_size, tok.eos_id) == (512, m["eos_id"])
    sample = "  def f(x):\n\treturn x ** 2  # ünïcödé 日本語 🎉\n\n"
    assert tok.decode(tok.encode(sample)) == sample

    # The stream is the documents in key order, each followed by EOS.
    documents = [topics[k] for k in sorted(topics) if topics[k].strip()]
    train = shard_tokens(args.dir, src["train_shards"])
    eos = np.flatnonzero(train == m["eos_id"])
    assert len(eos) == src["train_documents"]
    assert tok.decode(train[: eos[0]]) == documents[0]
    assert tok.decode(train[eos[0] + 1: eos[1]]) == documents[1]
    val = shard_tokens(args.dir, src["val_shards"])
    assert val[-1] == m["eos_id"] and tok.decode(val[:-1]).endswith(documents[-1])


def test_prepare_is_deterministic(pydoc, tmp_path):
    args, m = pydoc
    again = prepare(DataArgs(dir=str(tmp_path), vocab_size=512, seq_len=64), progress=False)
    assert again["fingerprint"] == m["fingerprint"]
    for name in ["tokenizer.json"] + [s["file"] for s in m["sources"][0]["train_shards"]]:
        with open(os.path.join(args.dir, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name


def write_source(kind, root, docs):
    """Writes `docs` as a source of the given kind under `root` and returns its data.sources path."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "txt":
        (root / "a.txt").write_text("\n\n".join(docs) + "\n")
        return str(root / "a.txt")
    if kind == "jsonl":
        with open(root / "a.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps({"id": 1, "text": d}) + "\n")
        return str(root / "a.jsonl")
    if kind == "parquet":
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), root / "a.parquet")
        return str(root / "a.parquet")
    if kind == "saved":
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "saved"))
        return str(root / "saved")
    if kind == "dir":  # two files, read in name order
        half = len(docs) // 2
        (root / "files").mkdir()
        (root / "files" / "1.txt").write_text("\n\n".join(docs[:half]))
        (root / "files" / "2.txt").write_text("\n\n".join(docs[half:]))
        return str(root / "files")
    if kind == "glob":
        (root / "g").mkdir()
        pq.write_table(pa.table({"text": docs}), root / "g" / "x.parquet")
        (root / "g" / "ignored.txt").write_text("not matched by the pattern")
        return str(root / "g" / "*.parquet")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "saved", "dir", "glob"])
def test_file_sources(pydoc, tmp_path, kind):
    docs = documents(30)
    path = write_source(kind, tmp_path / "src", docs)
    args = DataArgs(sources=[DataSource(path)], dir=str(tmp_path / "out"), tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    m = prepare(args, progress=False)
    src = m["sources"][0]
    assert src["documents"] == 30 and src["val_documents"] >= 1
    tok = load_tokenizer(args.dir)
    stream = np.concatenate([shard_tokens(args.dir, src["train_shards"]), shard_tokens(args.dir, src["val_shards"])])
    decoded = [tok.decode(d[:-1]) for d in np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]]
    assert [d.strip("\n") for d in decoded] == docs


def decoded_documents(args, m, source=0):
    tok = load_tokenizer(args.dir)
    src = m["sources"][source]
    stream = np.concatenate([shard_tokens(args.dir, src["train_shards"]), shard_tokens(args.dir, src["val_shards"])])
    return [tok.decode(d[:-1]) for d in np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]]


@pytest.mark.parametrize("split, expected", [
    # WikiText's raw files hold a space on their "empty" lines: those separate documents too
    ("blank-line", ["= Title =", "first paragraph\nstill first", "second", "= = Part = =\nthird"]),
    ("line", ["= Title =", "first paragraph", "still first", "second", "= = Part = =", "third"]),
    ("whole-file", [" = Title =\n \nfirst paragraph\nstill first\n \n\nsecond\n \n= = Part = =\nthird"]),
    ("regex:=( =)? \\w+ (= )?=", [" \nfirst paragraph\nstill first\n \n\nsecond\n ", "third"]),
])
def test_text_split_rules(pydoc, tmp_path, split, expected):
    path = tmp_path / "wiki.txt"
    path.write_text("= Title =\n \nfirst paragraph\nstill first\n \n\nsecond\n \n= = Part = =\nthird\n")
    if split == "whole-file":
        path.write_text(" " + path.read_text().removesuffix("\n"))
    args = DataArgs(sources=[DataSource(str(path), split=split)], dir=str(tmp_path / "out"),
                    tokenizer=tokenizer_of(pydoc), seq_len=2, val_fraction=0.3)
    m = prepare(args, progress=False)
    assert decoded_documents(args, m) == expected
    assert m["sources"][0]["documents"] == len(expected)


def test_a_long_text_without_blank_lines_is_streamed_in_pieces_and_stays_whole(pydoc, tmp_path, monkeypatch):
    """A document is handed on in pieces (here of 200 characters): EOS only at its end, and its
    text comes back exactly; the pieces never hold it whole."""
    import launcher.data.text as text

    monkeypatch.setattr(text, "PIECE_CHARS", 200)
    monkeypatch.setattr(text, "READ_BYTES", 64)
    lines = [f"line {i} of one long document, with no blank line anywhere" for i in range(300)]
    lines[150] = "x" * 1000  # one line longer than a piece
    (tmp_path / "long.txt").write_text("\n".join(lines) + "\n")
    pieces = list(text.text_pieces([str(tmp_path / "long.txt")], "blank-line"))
    assert len(pieces) > 50 and max(len(p["text"]) for p in pieces) < 200 + 64
    assert [p["last"] for p in pieces] == [False] * (len(pieces) - 1) + [True]
    args = DataArgs(sources=[DataSource(str(tmp_path / "long.txt"))], dir=str(tmp_path / "out"),
                    tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    m = prepare(args, progress=False)
    assert decoded_documents(args, m) == ["\n".join(lines)] and m["sources"][0]["documents"] == 1


def test_the_split_rule_is_part_of_what_was_prepared(pydoc, tmp_path):
    path = write_source("txt", tmp_path / "s", documents(20))
    args = DataArgs(sources=[DataSource(path)], dir=str(tmp_path / "out"), tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    ensure_prepared(args, is_main=True, barrier=lambda: None)
    args.sources[0].split = "line"
    with pytest.raises(ValueError, match=r"differs in: sources"):
        ensure_prepared(args, is_main=True, barrier=lambda: None)
    jsonl = DataArgs(sources=[DataSource(write_source("jsonl", tmp_path / "j", documents(20)), split="line")],
                     dir=str(tmp_path / "o2"), tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    with pytest.raises(ValueError, match=r"data.sources\[0\].split: applies to .txt files"):
        prepare(jsonl, progress=False)


def test_missing_text_column_is_named(pydoc, tmp_path):
    with open(tmp_path / "a.jsonl", "w") as f:
        f.write(json.dumps({"content": "hello"}) + "\n")
    args = DataArgs(sources=[DataSource(str(tmp_path / "a.jsonl"))], dir=str(tmp_path / "out"), tokenizer=tokenizer_of(pydoc))
    with pytest.raises(ValueError, match=r"data.text_field: column 'text' not found.*\['content'\]"):
        prepare(args, progress=False)
    # text_field picks the column.
    args.text_field, args.seq_len = "content", 1
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"content": d}) + "\n" for d in documents(5))
    assert prepare(args, progress=False)["sources"][0]["documents"] == 5


def test_user_errors_name_the_key(pydoc, tmp_path):
    def attempt(path, **kw):
        prepare(DataArgs(sources=[DataSource(BUILTIN_PYDOC), DataSource(path)], dir=str(tmp_path / "o"),
                         tokenizer=tokenizer_of(pydoc), **kw), progress=False)

    with pytest.raises(FileNotFoundError, match=r"data.sources\[1\].path: no such file or directory: 'nope.txt'"):
        attempt("nope.txt")
    with pytest.raises(FileNotFoundError, match=r"data.sources\[1\].path: the pattern"):
        attempt(str(tmp_path / "*.txt"))
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(ValueError, match=r"data.sources\[1\].path: unsupported file type .csv"):
        attempt(str(tmp_path / "a.csv"))
    (tmp_path / "small.txt").write_text("tiny\n\ntext")
    with pytest.raises(ValueError, match=r"data.sources\[1\] .* is too small: \d+ tokens in 2 documents"):
        attempt(str(tmp_path / "small.txt"))
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer: no such file"):
        prepare(DataArgs(dir=str(tmp_path / "o"), tokenizer=str(tmp_path / "none.model")), progress=False)


def test_failed_prepare_leaves_no_manifest(pydoc, tmp_path):
    good = DataArgs(sources=[DataSource(write_source("txt", tmp_path / "s", documents(20)))],
                    dir=str(tmp_path / "out"), tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    prepare(good, progress=False)
    assert load_manifest(good.dir) is not None
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    good.sources.append(DataSource(str(tmp_path / "bad.jsonl")))
    with pytest.raises(ValueError, match="body"):
        prepare(good, progress=False)
    assert load_manifest(good.dir) is None


def test_huggingface_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = documents(40)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    args = DataArgs(sources=[DataSource(write_source("txt", tmp_path / "s", docs))], dir=str(tmp_path / "out"),
                    tokenizer=str(tmp_path / "tokenizer.json"), seq_len=SEQ)
    m = prepare(args, progress=False)
    assert m["tokenizer"] == {"file": "tokenizer.json", "kind": "huggingface"}
    assert m["eos_id"] == hf.token_to_id("<|endoftext|>")
    tok = load_tokenizer(args.dir)  # the copy in the data dir, which must know its EOS
    assert tok.eos_id == m["eos_id"] and tok.decode(tok.encode("Ünïcode ok?\n")) == "Ünïcode ok?\n"

    bare = Tokenizer(models.BPE())
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match="data.tokenizer: the tokenizer has no end-of-sequence token"):
        prepare(DataArgs(sources=args.sources, dir=str(tmp_path / "o2"), tokenizer=str(tmp_path / "bare.json")),
                progress=False)


def test_token_dtype():
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_units_hold_whole_documents_and_change_nothing(pydoc, tmp_path, kind):
    """Cut into many small units and tokenized by two processes, a source gives the very tokens of
    one unit in one process: units fall between documents, and windows stay inside a unit."""
    docs = documents(400, lambda i: f"Document {i}.\n" + "words and more words " * (1 + i % 7))
    path = write_source(kind, tmp_path / "s", docs)
    if kind == "parquet":  # row groups of 20 records: the units of a parquet file
        pq.write_table(pa.table({"text": docs}), path, row_group_size=20)
    whole = DataArgs(sources=[DataSource(path)], dir=str(tmp_path / "whole"), tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    cut = DataArgs(sources=[DataSource(path)], dir=str(tmp_path / "cut"), tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    a = prepare(whole, progress=False, processes=1)
    b = prepare(cut, progress=False, processes=2, unit_mb=0.002)
    assert len(a["sources"][0]["train_shards"]) == 1 and len(b["sources"][0]["train_shards"]) > 5
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(whole.dir, a["sources"][0][f"{split}_shards"]),
                              shard_tokens(cut.dir, b["sources"][0][f"{split}_shards"]))
    for key in ("documents", "train_documents", "val_documents", "train_tokens", "val_tokens", "conditional_entropy"):
        assert a["sources"][0][key] == b["sources"][0][key], key
    tok = load_tokenizer(cut.dir)
    for shard in b["sources"][0]["train_shards"]:  # every unit starts a document
        first = np.asarray(open_shard(cut.dir, shard, "uint16"))
        assert tok.decode(first[:20]).startswith("Document ")
    x, y = TokenBatches(b, cut.dir, [1.0], SEQ, seed=0).train_batch(0, 0, 0, 64)
    tiles = [np.lib.stride_tricks.sliding_window_view(np.asarray(open_shard(cut.dir, s, "uint16")), SEQ + 1)
             for s in b["sources"][0]["train_shards"]]
    for row in torch.cat([x, y[:, -1:]], 1).numpy():
        assert any((t == row).all(1).any() for t in tiles)


# --------------------------------------------------------------------------------------------
# batches


def test_train_batch_is_a_function_of_seed_step_rank_micro(pydoc):
    args, m = pydoc
    a = TokenBatches(m, args.dir, [1.0], 32, seed=7)
    b = TokenBatches(m, args.dir, [1.0], 32, seed=7)
    later = a.train_batch(5, 1, 0, 8)  # call order must not matter
    x, y = a.train_batch(3, 1, 2, 8)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < a.vocab_size
    bx, by = b.train_batch(3, 1, 2, 8)
    assert torch.equal(x, bx) and torch.equal(y, by)
    assert torch.equal(b.train_batch(5, 1, 0, 8)[0], later[0])
    for other in [a.train_batch(4, 1, 2, 8), a.train_batch(3, 0, 2, 8), a.train_batch(3, 1, 1, 8),
                  TokenBatches(m, args.dir, [1.0], 32, seed=8).train_batch(3, 1, 2, 8)]:
        assert not torch.equal(x, other[0])


def two_source_dir(pydoc, tmp_path):
    rng = np.random.default_rng(0)
    letters = [" ".join("".join(rng.choice(list("abc"), 4)) for _ in range(20)) for _ in range(30)]
    digits = [" ".join("".join(rng.choice(list("0123456789"), 4)) for _ in range(20)) for _ in range(30)]
    args = DataArgs(sources=[DataSource(write_source("txt", tmp_path / "l", letters)),
                             DataSource(write_source("jsonl", tmp_path / "d", digits))],
                    dir=str(tmp_path / "out"), tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    return args, prepare(args, progress=False)


def test_weighted_mixture(pydoc, tmp_path):
    args, m = two_source_dir(pydoc, tmp_path)
    tok = load_tokenizer(args.dir)

    def letter_rows(weights, batches=40):
        tb = TokenBatches(m, args.dir, weights, SEQ, seed=1)
        counts = [0, 0]
        for step in range(batches):
            for row in tb.train_batch(step, 0, 0, 50)[0]:
                text = tok.decode(row.tolist())
                is_digits = any(c.isdigit() for c in text)
                assert is_digits != any(c in "abc" for c in text)  # a window never mixes sources
                counts[is_digits] += 1
        return counts[0] / sum(counts)

    assert abs(letter_rows([3.0, 1.0]) - 0.75) < 0.04
    assert letter_rows([1.0, 0.0], batches=5) == 1.0
    assert letter_rows([0.0, 2.0], batches=5) == 0.0
    for bad in ([1.0, -1.0], [0.0, 0.0], [1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match=r"data.sources"):
            TokenBatches(m, args.dir, bad, SEQ, seed=1)


def test_val_batches_per_source_fixed_disjoint_equal_in_number_and_free_of_the_mixture(pydoc, tmp_path):
    args, m = two_source_dir(pydoc, tmp_path)
    tb = TokenBatches(m, args.dir, [1.0, 1.0], SEQ, seed=1)
    # Another seed and another mixture (the second source held out only): the same held-out windows.
    others = [TokenBatches(m, args.dir, [1.0, 1.0], SEQ, seed=99), TokenBatches(m, args.dir, [3.0, 0.0], SEQ, seed=1)]
    assert tb.held_out_sources() == [0, 1] == others[1].held_out_sources()
    tok = load_tokenizer(args.dir)

    def rows(batches):
        return [tuple(r) for x, y in batches for r in torch.cat([x, y[:, -1:]], 1).tolist()]

    total = 0
    for source, s in enumerate(m["sources"]):
        tokens = shard_tokens(args.dir, s["val_shards"])
        val_tiles = {tuple(t) for t in tokens[: len(tokens) // (SEQ + 1) * (SEQ + 1)].reshape(-1, SEQ + 1)}
        assert len(val_tiles) >= 8
        total += len(val_tiles)
        per_rank = [tb.val_batches(source, r, 2, 2, 2) for r in range(2)]
        assert [len(b) for b in per_rank] == [2, 2] and all(x.shape == (2, SEQ) for b in per_rank for x, _ in b)
        r0, r1 = rows(per_rank[0]), rows(per_rank[1])
        assert set(r0).isdisjoint(r1) and len(set(r0 + r1)) == 8 and set(r0 + r1) <= val_tiles
        assert all(rows(o.val_batches(source, 0, 2, 2, 2)) == r0 for o in others)
        assert set(rows(tb.val_batches(source, 0, 1, 4, 2))) == set(r0 + r1)  # same set, whatever the rank count
        text = tok.decode([t for r in r0 for t in r])
        assert any(c.isdigit() for c in text) == (source == 1)  # each set holds its own source only
        # More windows asked for than exist: wrap around, same count on every rank.
        many = [tb.val_batches(source, r, 3, len(val_tiles), 2) for r in range(3)]
        assert [len(b) for b in many] == [len(val_tiles)] * 3
        assert set(sum((rows(b) for b in many), [])) == val_tiles
    assert tb.val_windows() == total


def test_seq_len_too_large(pydoc):
    args, m = pydoc
    with pytest.raises(ValueError, match=r"data.seq_len=100000 is too large for data.sources\[0\]"):
        TokenBatches(m, args.dir, [1.0], 100_000, seed=0)


# --------------------------------------------------------------------------------------------
# ensure_prepared


def test_ensure_prepared_reuses_and_refuses(pydoc, tmp_path):
    args, m = pydoc
    calls = []
    stamp = os.stat(os.path.join(args.dir, "manifest.json")).st_mtime_ns
    reweighted = DataArgs(sources=[DataSource(BUILTIN_PYDOC, weight=5.0)], dir=args.dir, vocab_size=512, seq_len=32)
    assert ensure_prepared(reweighted, is_main=True, barrier=lambda: calls.append(1)) == m
    assert calls == [1] and os.stat(os.path.join(args.dir, "manifest.json")).st_mtime_ns == stamp

    other = DataArgs(sources=[DataSource(write_source("txt", tmp_path / "s", documents(20)))], dir=args.dir,
                     vocab_size=512, seq_len=SEQ)
    for is_main in (True, False):
        with pytest.raises(ValueError, match=r"prepared from different sources/tokenizer \(differs in: sources\).*delete it"):
            ensure_prepared(other, is_main=is_main, barrier=lambda: None)
    bigger_vocab = DataArgs(dir=args.dir, vocab_size=1024)
    with pytest.raises(ValueError, match="differs in: tokenizer"):
        ensure_prepared(bigger_vocab, is_main=False, barrier=lambda: None)


def test_ranks_never_wait_on_one_ranks_tokenization(pydoc, tmp_path):
    """Two ranks on an unprepared data dir: both stop at once with the line naming lawa-prepare, and
    nothing was tokenized; once it is prepared, both read the same manifest."""
    args = DataArgs(sources=[DataSource(write_source("parquet", tmp_path / "s", documents(20)))],
                    dir=str(tmp_path / "out"), tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    barrier = threading.Barrier(2, timeout=60)
    results = {}

    def rank(r):
        try:
            results[r] = ensure_prepared(args, is_main=r == 0, barrier=barrier.wait, world_size=2)
        except FileNotFoundError as e:
            results[r] = str(e)

    def both():
        threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    both()
    assert all("is not prepared, and every rank would wait while one tokenizes it" in results[r] and
               "lawa-prepare --job JOB" in results[r] for r in (0, 1))
    assert not os.path.exists(args.dir) or not os.listdir(args.dir)
    prepare(args, progress=False)
    both()
    assert results[0] == results[1] == load_manifest(args.dir)

    # Editing a source file changes the fingerprint (size and mtime are in it).
    with open(args.sources[0].path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"differs in: sources"):
        ensure_prepared(args, is_main=True, barrier=lambda: None)

    with pytest.raises(FileNotFoundError, match="is not prepared, and every rank would wait.*lawa-prepare"):
        ensure_prepared(DataArgs(dir=str(tmp_path / "empty")), is_main=False, barrier=lambda: None)


def test_ensure_prepared_releases_the_other_ranks_when_main_fails(tmp_path, capsys):
    args = DataArgs(sources=[DataSource("missing.txt")], dir=str(tmp_path / "out"))
    barrier = threading.Barrier(2, timeout=60)
    errors = {}

    def rank(r):
        try:
            ensure_prepared(args, is_main=r == 0, barrier=barrier.wait)
        except Exception as e:  # noqa: BLE001 - the test looks at which error each rank got
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(errors[0], FileNotFoundError) and "data.sources[0].path" in str(errors[0])
    assert isinstance(errors[1], FileNotFoundError)


def test_progress_lines(pydoc, tmp_path, capsys):
    args = DataArgs(sources=[DataSource(write_source("txt", tmp_path / "s", documents(20)))],
                    dir=str(tmp_path / "out"), tokenizer=tokenizer_of(pydoc), seq_len=SEQ)
    m = prepare(args, progress=True)
    out = capsys.readouterr().out
    total = sum(s["train_tokens"] + s["val_tokens"] for s in m["sources"])
    assert "preparing 1 unit" in out and "1/1 units, 20 documents, " in out and "tokens/s, ETA 0s" in out
    assert f"prepared {args.dir}: {total:,} tokens from 1 source" in out
    prepare(args, progress=False)
    assert capsys.readouterr().out == ""


def test_builtin_corpora_need_no_path_and_unknown_ones_are_named(tmp_path):
    from launcher.data.preparation import fingerprint
    from launcher.data.sources import BUILTIN_CORPORA, BUILTIN_STDLIB

    documents = BUILTIN_CORPORA[BUILTIN_STDLIB]()
    assert len(documents) > 300 and sum(map(len, documents)) > 5_000_000
    assert any("def " in d for d in documents[:20])
    assert fingerprint(DataArgs(sources=[DataSource(BUILTIN_STDLIB)])) != fingerprint(DataArgs())
    with pytest.raises(ValueError, match=r"data.sources\[0\].path: unknown builtin corpus 'builtin:wiki'"):
        prepare(DataArgs(sources=[DataSource("builtin:wiki")], dir=str(tmp_path / "x")), progress=False)
