"""Preprocessing (sentencepiece + Megatron indexed datasets) and the clear errors for bad data / tokenizer files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_based.training import data
from megatron_based.training.data import DataError

CORPUS = Path(data.__file__).parents[1] / "tasks" / "demo_data" / "kjv.txt"
VOCAB = 512  # > 256 byte-fallback pieces + the characters + specials


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """A 60 KB slice of the shipped corpus, preprocessed once for the session: ``prefix``, ``tokenizer``."""
    root = tmp_path_factory.mktemp("corpus")
    text = CORPUS.read_text()[:60_000]
    src = root / "kjv_small.txt"
    src.write_text(text[: text.rindex("\n\n")])
    info = data.preprocess([str(src)], str(root / "kjv"), vocab_size=VOCAB, show_progress=False)
    return {"prefix": info["prefix"], "tokenizer": info["tokenizer_model"], "info": info, "source": src}


def test_preprocess_writes_documents_that_round_trip(corpus):
    tok = data.load_tokenizer(corpus["tokenizer"])
    docs = list(data.read_documents(corpus["source"]))
    ds = data.open_indexed(corpus["prefix"])
    assert len(ds) == len(docs) == corpus["info"]["documents"] > 10
    assert sum(len(ds[i]) for i in range(len(ds))) == corpus["info"]["tokens"]
    for i in (0, len(docs) // 2, len(docs) - 1):
        ids = ds[i]
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert tok.detokenize(ids[:-1].tolist()) == docs[i]
    assert ds[0].dtype == np.uint16


def test_jsonl_input_and_existing_tokenizer(corpus, tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"content": t}) for t in ["In the beginning", "And God said"]) + "\n")
    info = data.preprocess([str(src)], str(tmp_path / "j"), tokenizer_model=corpus["tokenizer"], json_key="content",
                           show_progress=False)
    tok = data.load_tokenizer(corpus["tokenizer"])
    ds = data.open_indexed(info["prefix"])
    assert [tok.detokenize(ds[i][:-1].tolist()) for i in range(2)] == ["In the beginning", "And God said"]


def test_unigram_entropy_matches_counts(corpus):
    ds = data.open_indexed(corpus["prefix"])
    ids = np.concatenate([ds[i] for i in range(len(ds))])
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    assert data.unigram_entropy(corpus["prefix"], VOCAB) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_bad_inputs_name_the_file(corpus, tmp_path):
    with pytest.raises(DataError, match="missing.txt does not exist"):
        data.preprocess([str(tmp_path / "missing.txt")], str(tmp_path / "x"), show_progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text key"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with a 'text' string"):
        data.preprocess([str(bad)], str(tmp_path / "b"), tokenizer_model=corpus["tokenizer"], show_progress=False)


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(DataError, match="nothing.model does not exist"):
        data.load_tokenizer(tmp_path / "nothing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError, match="junk.model could not be loaded as a sentencepiece model"):
        data.load_tokenizer(junk)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Megatron's __del__ after a bad header
def test_missing_truncated_or_corrupt_dataset(corpus, tmp_path):
    prefix = str(tmp_path / "copy")
    for ext in (".bin", ".idx"):
        (tmp_path / f"copy{ext}").write_bytes(Path(corpus["prefix"] + ext).read_bytes())
    with pytest.raises(DataError, match=r"nope.idx does not exist"):
        data.open_indexed(str(tmp_path / "nope"))
    binf = Path(prefix + ".bin")
    binf.write_bytes(binf.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"copy.bin has \d+ bytes but .*copy.idx describes \d+"):
        data.open_indexed(prefix)
    Path(prefix + ".idx").write_bytes(b"garbage header")
    with pytest.raises(DataError, match=r"copy.idx is not a valid Megatron index file"):
        data.open_indexed(prefix)


def test_preprocess_cli_reports_errors(tmp_path, capsys):
    assert data.main([str(tmp_path / "absent.txt"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert "absent.txt does not exist" in capsys.readouterr().err


def write_indexed(prefix: str, docs: list[list[int]], dtype=np.uint16) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for ids in docs:
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


def test_token_ids_outside_the_vocabulary_name_the_file_the_id_and_where(tmp_path):
    prefix = write_indexed(str(tmp_path / "other_tokenizer"), [[5, 7, 1], [3, 600, 2, 1]])
    with pytest.raises(DataError, match=r"other_tokenizer.bin holds token id 600 \(document 1, token 1\), outside "
                                        r"the vocabulary \[0, 512\) of the tokenizer t.model \(512 ids\) and "
                                        r"model.vocab_size \(1024\)"):
        data.check_token_ids(prefix, 512, 1024, "t.model")
    data.check_token_ids(prefix, 601, 1024)  # 600 is inside a 601-id vocabulary
    with pytest.raises(DataError, match=r"token id 600 .* \[0, 600\) .* model.vocab_size \(600\)"):
        data.check_token_ids(prefix, 1024, 600)  # the model's vocabulary is the tighter one
    negative = write_indexed(str(tmp_path / "negative"), [[4, -3, 1]], dtype=np.int32)
    with pytest.raises(DataError, match=r"negative.bin holds token id -3 \(document 0, token 1\)"):
        data.check_token_ids(negative, 512, 512)


def test_token_id_range_is_cached_per_file_version(corpus, tmp_path, monkeypatch):
    ds = data.open_indexed(corpus["prefix"])
    ids = np.concatenate([ds[i] for i in range(len(ds))])
    cache = tmp_path / "cache"
    assert data.token_id_range(corpus["prefix"], str(cache)) == (int(ids.min()), int(ids.max()))
    assert len(list(cache.glob("kjv-*.token_ids.json"))) == 1
    data.check_token_ids(corpus["prefix"], VOCAB, VOCAB, corpus["tokenizer"], str(cache))

    def no_read(*a, **kw):
        raise AssertionError("the .bin was read again")

    with monkeypatch.context() as m:  # a cache hit reads one small JSON file, not the .bin
        m.setattr(np, "memmap", no_read)
        assert data.token_id_range(corpus["prefix"], str(cache)) == (int(ids.min()), int(ids.max()))
    # the same file rewritten (same size, new content and time): read again
    prefix = write_indexed(str(tmp_path / "data"), [[5, 7, 1]])
    assert data.token_id_range(prefix, str(cache)) == (1, 7)
    write_indexed(prefix, [[5, 900, 1]])
    os.utime(prefix + ".bin", ns=(1, 1))
    assert data.token_id_range(prefix, str(cache)) == (1, 900)


def test_build_datasets_refuses_ids_beyond_the_tokenizer(tmp_path):
    """Checked before Megatron builds any index: the error names the file and the id."""
    prefix = write_indexed(str(tmp_path / "big_ids"), [[5, 7, 1], [3, 700, 1]])
    cfg = SimpleNamespace(model={"vocab_size": 1024}, train=SimpleNamespace(save=None, seed=1),
                          data=SimpleNamespace(path=[prefix], weights=None, split="95,5,0", cache_dir=None,
                                               tokenizer_model="small.model"))
    with pytest.raises(DataError, match=r"big_ids.bin holds token id 700 \(document 1, token 1\), outside the "
                                        r"vocabulary \[0, 512\) of the tokenizer small.model"):
        data.build_datasets(cfg, 16, SimpleNamespace(vocab_size=512), 10, 1)


@pytest.mark.parametrize("name, text", [("empty.txt", ""), ("blank.txt", "\n\n  \n\n\n"),
                                        ("blank.jsonl", '{"text": "  "}\n\n')])
@pytest.mark.parametrize("new_tokenizer", [True, False])
def test_an_empty_or_blank_corpus_is_refused_before_anything_is_written(corpus, tmp_path, capsys, name, text,
                                                                        new_tokenizer):
    src = tmp_path / name
    src.write_text(text)
    args = [str(src), "--output-prefix", str(tmp_path / "out")]
    assert data.main(args + ([] if new_tokenizer else ["--tokenizer-model", corpus["tokenizer"]])) == 2
    assert capsys.readouterr().err == (f"error: no documents in {src}: the input is empty or blank (JSONL: no "
                                       "non-blank 'text' field); give a corpus with text\n")
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("split", ["90,7,3", "95,5,0", "1,0,0", "60,0,40", "2, 1"])
def test_split_documents_are_the_ones_megatron_builds(corpus, tmp_path, split):
    """``split_documents`` (the config check's arithmetic) against the document indices of Megatron's datasets."""
    n = len(data.open_indexed(corpus["prefix"]))
    cfg = SimpleNamespace(model={"vocab_size": VOCAB}, train=SimpleNamespace(save=None, seed=1),
                          data=SimpleNamespace(path=[corpus["prefix"]], weights=None, split=split,
                                               cache_dir=str(tmp_path), tokenizer_model=corpus["tokenizer"]))
    built = data.build_datasets(cfg, 16, data.load_tokenizer(corpus["tokenizer"]), 10, 1)
    for ds, docs in zip(built, data.split_documents(split, n)):
        assert (ds is None and docs is None) or ds.indices.tolist() == list(range(*docs))
    # Five documents: round(4.5) = 4, round(4.85) = 5, and the test split is empty (Megatron would never return).
    assert data.split_documents("90,7,3", 5) == [(0, 4), (4, 5), (5, 5)]
