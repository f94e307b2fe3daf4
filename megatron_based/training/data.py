"""Data: a sentencepiece tokenizer, Megatron indexed datasets (``.bin/.idx``) and the GPT datasets read in training.

``megatron-based-preprocess`` turns JSONL (one ``{"text": ...}`` document per line) or plain-text files (documents
separated by blank lines) into ``PREFIX.bin/.idx``, training ``PREFIX.model`` first unless ``--tokenizer-model``
is given. Training reads them with Megatron-Core's ``GPTDataset`` through ``BlendedMegatronDatasetBuilder``
(train/valid/test split, document-shuffled, seeded).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..model.config import ConfigError
from ..runtime.noise import quiet_known_warnings
from .cli import preprocess_parser
from .logs import progress_bar

DOC_SEPARATOR = "\n\n"


class DataError(ValueError):
    """Missing or unreadable data / tokenizer files; the message names the file."""


def read_documents(path: str | os.PathLike, json_key: str = "text") -> Iterator[str]:
    """Documents of one input file: JSONL lines (``json_key`` field) or blank-line-separated plain text."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{lineno}: expected a JSON object with a {json_key!r} string ({e})") \
                        from None
                if doc.strip():
                    yield doc
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None
    for doc in text.split(DOC_SEPARATOR):
        if doc.strip():
            yield doc.strip("\n")


def train_tokenizer(inputs: list[str], model_prefix: str, vocab_size: int, json_key: str = "text") -> str:
    """Train a BPE sentencepiece model on the documents; ids: 0 <unk>, 1 </s> (end of document). Returns .model."""
    import sentencepiece as spm

    docs = (d for p in inputs for d in read_documents(p, json_key))
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=docs, model_prefix=model_prefix, vocab_size=vocab_size,
                                       model_type="bpe", character_coverage=1.0, byte_fallback=True, unk_id=0,
                                       eos_id=1, bos_id=-1, pad_id=-1, split_digits=True, minloglevel=2,
                                       max_sentence_length=1 << 20, num_threads=1, normalization_rule_name="identity",
                                       remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    except RuntimeError as e:  # e.g. a vocabulary smaller than 256 byte pieces + the corpus's characters
        raise DataError(f"sentencepiece training on {inputs} failed (change --vocab-size?): {e}") from None
    return model_prefix + ".model"


class ByteTokenizer:
    """Raw UTF-8 bytes as tokens (vocabulary 256, no end-of-document id), for tiny demos: the tokenizer called
    ``bytes`` (generation, evaluation). Same interface as Megatron's tokenizer where inference uses it."""

    vocab_size = 256
    eod = None

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def detokenize(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def load_tokenizer(model_path: str | os.PathLike):
    """Megatron-Core's sentencepiece tokenizer (``.tokenize``, ``.detokenize``, ``.eod``, ``.vocab_size``) of a
    ``.model`` file, or for ``bytes`` a :class:`ByteTokenizer` (for tiny demos; training and preprocessing need a
    sentencepiece model)."""
    model_path = str(model_path)
    if model_path == "bytes":
        return ByteTokenizer()
    from megatron.core.tokenizers import MegatronTokenizer

    if not Path(model_path).is_file():
        raise DataError(f"tokenizer model {model_path} does not exist")
    try:
        return MegatronTokenizer.from_pretrained(model_path, metadata_path={"library": "sentencepiece"})
    except Exception as e:  # sentencepiece raises RuntimeError / OSError with little context
        raise DataError(f"tokenizer model {model_path} could not be loaded as a sentencepiece model ({e})") from None


def end_of_document(tokenizer) -> int | None:
    """The tokenizer's end-of-document id, or None where it has none."""
    eod = getattr(tokenizer, "eod", None)
    return eod if isinstance(eod, int) and eod >= 0 else None


def preprocess(inputs: list[str], output_prefix: str, *, tokenizer_model: str | None = None, vocab_size: int = 1024,
               json_key: str = "text", show_progress: bool = True) -> dict:
    """Tokenize documents into ``output_prefix.bin/.idx`` (each document ends with the end-of-document token)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    if not inputs:
        raise DataError("no input files given")
    for p in inputs:
        if not Path(p).is_file():
            raise DataError(f"input file {p} does not exist")
    if next((d for p in inputs for d in read_documents(p, json_key)), None) is None:
        raise DataError(f"no documents in {', '.join(inputs)}: the input is empty or blank (JSONL: no non-blank "
                        f"{json_key!r} field); give a corpus with text")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    if tokenizer_model is None:
        tokenizer_model = train_tokenizer(inputs, output_prefix, vocab_size, json_key)
    if str(tokenizer_model) == "bytes":
        raise DataError("tokenizer model bytes has no end-of-document token: give a sentencepiece .model")
    tokenizer = load_tokenizer(tokenizer_model)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    builder = IndexedDatasetBuilder(get_bin_path(output_prefix), dtype=dtype)
    n_docs = n_tokens = done = 0
    total_bytes = sum(Path(p).stat().st_size for p in inputs)
    with progress_bar(show_progress) as bar:
        task = bar.add_task("tokenizing", total=total_bytes, stats="bytes")
        for p in inputs:
            for doc in read_documents(p, json_key):
                ids = tokenizer.tokenize(doc) + [tokenizer.eod]
                builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                n_docs += 1
                n_tokens += len(ids)
                done += len(doc.encode("utf-8")) + len(DOC_SEPARATOR)
                bar.update(task, completed=min(done, total_bytes))
    builder.finalize(get_idx_path(output_prefix))
    return {"documents": n_docs, "tokens": n_tokens, "tokenizer_model": tokenizer_model, "prefix": output_prefix,
            "vocab_size": tokenizer.vocab_size}


def open_indexed(prefix: str):
    """Megatron's ``IndexedDataset`` with a clear error for a missing, truncated or mismatched ``.bin/.idx``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".idx", ".bin"):
        if not Path(prefix + ext).is_file():
            raise DataError(f"{prefix + ext} does not exist (run megatron-based-preprocess)")
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except Exception as e:  # a bad header raises AssertionError, a short file ValueError
        raise DataError(f"{prefix}.idx is not a valid Megatron index file ({type(e).__name__}: {e})") from None
    needed = int(ds.index.sequence_pointers[-1] + ds.index.sequence_lengths[-1] * ds.index.dtype_size) \
        if len(ds) else 0
    actual = Path(prefix + ".bin").stat().st_size
    if actual != needed:
        raise DataError(f"{prefix}.bin has {actual} bytes but {prefix}.idx describes {needed}: the pair is "
                        "truncated or mismatched; re-run megatron-based-preprocess")
    return ds


SPLITS = ("train", "valid", "test")
SPLIT_FORMAT = re.compile(r"\s*(\d+\.?\d*|\.\d+)(\s*,\s*(\d+\.?\d*|\.\d+)){0,2}\s*")


def split_documents(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """The documents ``[begin, end)`` that Megatron's ``BlendedMegatronDatasetBuilder`` gives each split (train,
    valid, test) of a prefix holding ``num_documents``, from the ``data.split`` weights; None for weight 0."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    if not SPLIT_FORMAT.fullmatch(split) or not sum(float(w) for w in split.split(",")):
        raise DataError(f"data.split {split!r} must be up to three non-negative weights train,valid,test with a "
                        "positive sum, e.g. 98,2,0")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else (int(round(m[0] * num_documents)), int(round(m[1] * num_documents)))
            for m in matrix]


def check_split_sizes(prefixes: list[str], split: str, seq_length: int, eval_interval: int) -> None:
    """Refuse data that Megatron's ``GPTDataset`` cannot cut into samples, naming the prefix, the split and the
    numbers. A split with a nonzero weight and no documents never finishes building: ``_get_num_epochs`` adds epochs
    of 0 tokens until they reach the tokens asked for (even for the valid split of a run without validation, and for
    the test split, which is built with 0 samples). The train split must hold one sample (``seq_length + 1``
    tokens): with fewer, every sample repeats the same few documents. A smaller valid split still measures held-out
    text (its samples repeat it), so it only has to exist when ``eval_interval > 0``."""
    for prefix in prefixes:
        # An empty .bin cannot be memory-mapped: Megatron's IndexedDataset would blame the .idx. ``ds`` stays bound:
        # its lengths are a view of the .idx mapping, which the dataset unmaps when it is collected.
        ds = open_indexed(prefix) if Path(prefix + ".bin").stat().st_size else None
        lengths = ds.sequence_lengths if ds is not None else []
        if not len(lengths):
            raise DataError(f"data.path: {prefix}.bin is empty (preprocessed from an empty corpus?); re-run "
                            "megatron-based-preprocess on a corpus with text")
        for name, docs in zip(SPLITS, split_documents(split, len(lengths))):
            if docs is None:
                if name == "train":
                    raise DataError(f"data.split {split!r} gives the train split weight 0: give it a weight, e.g. "
                                    "98,2,0")
                if name == "valid" and eval_interval > 0:
                    raise DataError(f"data.split {split!r} gives the valid split weight 0 but train.eval_interval "
                                    f"({eval_interval}) needs it: give it a weight (e.g. 98,2,0) or set "
                                    "train.eval_interval=0")
                continue
            begin, end = docs
            tokens = int(lengths[begin:end].sum())
            where = (f"the {name} split of {prefix} (data.split {split!r}: documents [{begin}, {end}) of "
                     f"{len(lengths)}) holds {end - begin} documents, {tokens} tokens")
            if end == begin:
                drop = "" if name == "train" else ", or set its weight to 0" + (
                    " and train.eval_interval=0" if name == "valid" and eval_interval > 0 else "")
                raise DataError(f"{where}: Megatron never finishes building an empty split; add documents or raise "
                                f"its weight in data.split{drop}")
            if name == "train" and tokens < seq_length + 1:
                raise DataError(f"{where}, fewer than one sample of model.seq_length + 1 = {seq_length + 1}: add "
                                "documents, lower model.seq_length, or raise the train weight in data.split")


TOKEN_BLOCK = 1 << 26  # tokens per block of the one pass over a .bin (a few hundred MB at most in memory)


def token_id_range(prefix: str, cache_dir: str | None = None) -> tuple[int, int] | None:
    """(smallest, largest) token id in ``PREFIX.bin`` (None for an empty file): one pass over a memmap, in blocks.
    Cached in ``cache_dir`` (a JSON file per .bin, keyed on its path, size and modification time), so only the
    first run over a dataset reads it whole."""
    path = Path(prefix + ".bin").resolve()
    if not path.is_file():
        raise DataError(f"{prefix}.bin does not exist (run megatron-based-preprocess)")
    st = path.stat()
    key = {"bin": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = None
    if cache_dir:
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"{path.stem}-{digest}.token_ids.json"
        try:
            hit = json.loads(cache.read_text())
            if hit["key"] == key:
                return None if hit["range"] is None else tuple(hit["range"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    dtype = np.dtype(open_indexed(prefix).index.dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r") if st.st_size else np.zeros(0, dtype)
    found = None
    for i in range(0, tokens.size, TOKEN_BLOCK):
        block = tokens[i: i + TOKEN_BLOCK]
        lo, hi = int(block.min()), int(block.max())
        found = (lo, hi) if found is None else (min(found[0], lo), max(found[1], hi))
    if cache is not None:
        try:  # best effort: another rank may write the same file; os.replace keeps it whole
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "range": found}))
            os.replace(tmp, cache)
        except OSError:
            pass
    return found


def check_token_ids(prefix: str, tokenizer_vocab_size: int, model_vocab_size: int, tokenizer_model: str = "",
                    cache_dir: str | None = None) -> None:
    """Refuse ``PREFIX.bin`` when a token id lies outside ``[0, min(tokenizer, model vocabulary))``, naming the file,
    the id and where it is. Such ids (data tokenized with another tokenizer) would train silently at TP > 1 (the
    vocab-parallel embedding reads ids outside its rows as zeros) and fail inside the embedding at TP = 1 (a bare
    IndexError; a device-side assert on a GPU). The id range is cached (:func:`token_id_range`)."""
    found = token_id_range(prefix, cache_dir)
    limit = min(tokenizer_vocab_size, model_vocab_size)
    if found is None or (found[0] >= 0 and found[1] < limit):
        return
    bad = found[1] if found[1] >= limit else found[0]
    tokenizer = f"the tokenizer {tokenizer_model}" if tokenizer_model else "the tokenizer"
    raise DataError(f"{prefix}.bin holds token id {bad} ({_locate(prefix, bad)}), outside the vocabulary [0, {limit}) "
                    f"of {tokenizer} ({tokenizer_vocab_size} ids) and model.vocab_size ({model_vocab_size}): it was "
                    "tokenized with another tokenizer; re-run megatron-based-preprocess with this one "
                    "(--tokenizer-model), or train with the one it was made with")


def _locate(prefix: str, token_id: int) -> str:
    """'document d, token t': the first occurrence of ``token_id`` in ``PREFIX.bin`` (an error path: a second pass)."""
    ds = open_indexed(prefix)
    tokens = np.memmap(prefix + ".bin", dtype=np.dtype(ds.index.dtype), mode="r")
    for i in range(0, tokens.size, TOKEN_BLOCK):
        hits = np.flatnonzero(tokens[i: i + TOKEN_BLOCK] == token_id)
        if hits.size:
            pos = i + int(hits[0])
            starts = ds.index.sequence_pointers // np.dtype(ds.index.dtype).itemsize
            seq = int(np.searchsorted(starts, pos, side="right")) - 1
            doc = int(np.searchsorted(ds.document_indices, seq, side="right")) - 1
            return f"document {doc}, token {pos - int(starts[seq])}"
    return "position unknown"


def unigram_entropy(prefix: str, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies of an indexed dataset: the loss of the best context-free model."""
    ds = open_indexed(prefix)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(len(ds)):
        counts += np.bincount(ds[i], minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def build_datasets(cfg, seq_length: int, tokenizer, train_samples: int, valid_samples: int):
    """Train and validation ``GPTDataset`` (blended when several prefixes are given), built on every rank, after
    checking that every token id of each prefix lies inside the tokenizer's and the model's vocabulary."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d = cfg.data
    cache = d.cache_dir or (os.path.join(cfg.train.save, "data_cache") if cfg.train.save
                            else os.path.join(os.path.dirname(os.path.abspath(d.path[0])), "cache"))
    for prefix in d.path:
        open_indexed(prefix)
        check_token_ids(prefix, tokenizer.vocab_size, cfg.model["vocab_size"], d.tokenizer_model, cache)
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed, sequence_length=seq_length, blend=(list(d.path), d.weights), split=d.split,
        path_to_cache=cache, tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, mid_level_dataset_surplus=0.005)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_samples, 0], lambda: True,
                                                    config).build()
    if train is None:
        raise ConfigError(f"data.split {d.split!r} leaves no training documents")
    return train, valid


def batches(dataset, first_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> Iterator[dict]:
    """Micro-batches in global sample order: each global batch is split across data-parallel ranks, so the data
    position is one number (samples consumed) whatever the parallel layout."""
    step = first_sample
    while True:
        start = step + dp_rank * micro_batch_size
        samples = [dataset[i % len(dataset)] for i in range(start, start + micro_batch_size)]
        yield {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        step += micro_batch_size * dp_size


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings("--verbose" in argv)
    args = preprocess_parser().parse_args(argv)
    try:
        info = preprocess(args.inputs, args.output_prefix, tokenizer_model=args.tokenizer_model,
                          vocab_size=args.vocab_size, json_key=args.json_key)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{info['documents']} documents, {info['tokens']} tokens -> {info['prefix']}.bin/.idx "
          f"(tokenizer {info['tokenizer_model']}, vocabulary {info['vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
