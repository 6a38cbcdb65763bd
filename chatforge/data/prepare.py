"""`chatforge data prepare`: turn a text corpus into packed token shards on disk, once.

Documents are tokenized in batches over all cores, each followed by the document separator
(<|endoftext|>), and appended to flat binary shards (uint16 when the vocabulary fits, else uint32).
Training memory-maps the shards, so a corpus larger than RAM streams through and no tokenization
happens during training. For a plain byte-level BPE (what `chatforge tokenizer train` writes) the
tokenizing runs on tiktoken's BPE over the same vocabulary (the same ids, faster: see
`tokenizer.fast_batch_encoder`), else on the Rust `tokenizers` library.

Every `VAL_PERIOD`-th document (0.5% by default, document 0 included, so at least one) goes to the
validation split: deterministic, and held out by document rather than by token range.

A manifest.json records sources, tokenizer fingerprint and counts; re-running with the same inputs and
tokenizer finds the manifest and reuses the shards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge.config import option
from chatforge.data.shards import FORMAT_VERSION, MANIFEST, holds_shards, publish, read_manifest
from chatforge.errors import ChatforgeError
from chatforge.text.sources import SourceOptions

CHECK_EVERY = 64  # with the tiktoken path: one document in 64 is re-encoded by `tokenizers` and compared



@dataclass
class DataConfig(SourceOptions):
    """Settings of `chatforge data prepare` (and the data step of `pretrain`)."""

    tokenizer: str = option("", "any Hugging Face tokenizer directory", metavar="DIR")
    out: str = option("", "where to write the shards", metavar="DIR")
    val_fraction: float = option(0.005, "documents held out for validation (one in round(1/F))", min=0.0,
                                 max=0.5, exclusive_min=True, metavar="F")
    shard_tokens: int = option(100_000_000, "tokens per shard file", min=1, metavar="N")
    batch_docs: int = option(1024, "documents tokenized per batch", min=1, metavar="N")
    fast_tokenizer: bool = option(True, "tiktoken's BPE over the same vocabulary when it applies: same ids, faster")
    num_shards: int = option(1, "split the work across K workers (machines or processes); merge their outputs "
                                "with `chatforge data merge`", min=1, metavar="K")
    shard_index: int = option(0, "the part this worker writes: every K-th document from this one (0..K-1)", min=0,
                              metavar="I")

    def validate(self) -> None:
        if not self.out or not self.tokenizer:
            raise ChatforgeError("data prepare needs --tokenizer DIR and --out DIR")
        if self.shard_index >= self.num_shards:
            raise ChatforgeError(f"--shard-index {self.shard_index} must be below --num-shards {self.num_shards}")


def cache_key(cfg: DataConfig, tok_fingerprint: str) -> str:
    from chatforge.text.sources import describe_sources

    payload = {"sources": describe_sources(cfg.data), "tokenizer": tok_fingerprint,
               "val_fraction": cfg.val_fraction, "text_field": cfg.text_field,
               "doc_per_line": cfg.doc_per_line, "version": FORMAT_VERSION}
    if cfg.num_shards > 1:
        payload["part"] = [cfg.shard_index, cfg.num_shards]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class _ShardWriter:
    """Appends token arrays to numbered flat shard files of at most `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.handle = None
        self.in_shard = 0
        self.tokens = self.documents = self.bytes = 0

    def _open_next(self):
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self.handle = open(self.folder / name, "wb")
        self.in_shard = 0

    def write(self, ids: np.ndarray, documents: int, n_bytes: int) -> None:
        """Append the tokens of `documents` whole documents (separators included)."""
        self.documents += documents
        self.bytes += n_bytes
        while len(ids):
            if self.handle is None or self.in_shard >= self.shard_tokens:
                self._open_next()
            part = ids[: self.shard_tokens - self.in_shard]
            self.handle.write(part.astype(self.dtype, copy=False).tobytes())
            self.in_shard += len(part)
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)
            ids = ids[len(part):]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def summary(self) -> dict:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}


def prepare(cfg: DataConfig, tok=None, log=print) -> dict:
    """Tokenize and pack `cfg.data` into `cfg.out`; return the manifest (reusing a matching one)."""
    from tqdm.auto import tqdm

    from chatforge.text.sources import SourceStats, iter_texts
    from chatforge.text.tokenizer import document_separator_id, fast_batch_encoder, fingerprint, load_tokenizer

    from chatforge.outputs import check_not_inputs, check_replaceable, temporary_sibling

    check_not_inputs(cfg.out, [("--data", d) for d in cfg.data] + [("--tokenizer", cfg.tokenizer)])
    check_replaceable(cfg.out, holds_shards)
    tok = tok if tok is not None else load_tokenizer(cfg.tokenizer)
    tok_fp = fingerprint(tok)
    key = cache_key(cfg, tok_fp)
    out = Path(cfg.out)
    try:  # a manifest chatforge cannot read is not reused: the folder is rebuilt (check_replaceable allowed it)
        existing = read_manifest(out) if (out / MANIFEST).exists() else None
    except ChatforgeError:
        existing = None
    if existing is not None and existing.get("cache_key") == key:
        log(f"data: reusing {existing['train']['tokens']:,} train / {existing['val']['tokens']:,} val tokens in {out}")
        return existing

    vocab_size = len(tok)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    sep = document_separator_id(tok)
    backend = tok.backend_tokenizer  # Rust: encode_batch is parallel over all cores
    period = max(1, round(1 / cfg.val_fraction))
    tmp = temporary_sibling(out)
    writers = {s: _ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    stats = SourceStats()
    started = time.time()
    doc_index = 0  # documents read, every part's: the train/val split and the parts follow it
    written = 0    # documents this part tokenized
    bar = tqdm(desc="tokenizing", unit="doc", dynamic_ncols=True, delay=1)  # none for an error at the first file

    # encode_batch_fast: the same ids without character offsets, which nothing here needs (tokenizers >= 0.21)
    hf_encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    fast = fast_batch_encoder(tok) if cfg.fast_tokenizer else None

    def encode(batch: list[str]) -> list[list[int]]:
        """tiktoken when it applies, every CHECK_EVERY-th document re-encoded by `tokenizers` as a check."""
        nonlocal fast
        if fast is not None:
            ids = fast(batch)
            if [e.ids for e in hf_encode(batch[::CHECK_EVERY], add_special_tokens=False)] == ids[::CHECK_EVERY]:
                return ids
            fast = None
            log("data: tiktoken and tokenizers split a document differently: tokenizers from here on")
        return [e.ids for e in hf_encode(batch, add_special_tokens=False)]

    def flush(batch: list[tuple[int, str]]) -> None:
        """Tokenize a batch of (document index, text) and append it to the shards: one array and one write
        per split, not per document."""
        nonlocal written
        ids: dict[str, list[int]] = {"train": [], "val": []}
        docs, sizes = {"train": 0, "val": 0}, {"train": 0, "val": 0}
        for (index, text), doc_ids in zip(batch, encode([text for _, text in batch])):
            split = "val" if index % period == 0 else "train"
            ids[split] += doc_ids  # list += list runs in C; np.array of one flat list is ~3x np.fromiter
            ids[split].append(sep)
            docs[split] += 1
            sizes[split] += len(text.encode("utf-8"))
        for split, flat in ids.items():
            if flat:
                writers[split].write(np.array(flat, dtype=dtype), docs[split], sizes[split])
        written += len(batch)
        bar.update(len(batch))

    try:
        batch: list[tuple[int, str]] = []
        for text in iter_texts(cfg, stats):
            if doc_index % cfg.num_shards == cfg.shard_index:  # this worker's part
                batch.append((doc_index, text))
            doc_index += 1
            if len(batch) >= cfg.batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    if doc_index == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ChatforgeError(f"{', '.join(cfg.data)}: the corpus is empty after filtering ({stats.summary()})")
    if writers["train"].documents == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        part = f" (part {cfg.shard_index} of {cfg.num_shards}: {written})" if cfg.num_shards > 1 else ""
        raise ChatforgeError(f"{', '.join(cfg.data)}: only {doc_index} document(s){part}; need at least 2 "
                             "(one is held out for validation)")
    manifest = {
        "version": FORMAT_VERSION, "cache_key": key, "sources": cfg.data, "dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size, "tokenizer_fingerprint": tok_fp, "separator_id": sep,
        "val_fraction": cfg.val_fraction, "train": writers["train"].summary(), "val": writers["val"].summary(),
        "skipped": dict(stats.skipped), "invalid_utf8_lines": stats.invalid_utf8_lines,
        "records": stats.records, "seconds": round(time.time() - started, 2),
    }
    if cfg.num_shards > 1:
        manifest["part"] = {"index": cfg.shard_index, "of": cfg.num_shards, "documents_read": doc_index}
    publish(tmp, out, manifest)
    mb = manifest["train"]["bytes"] + manifest["val"]["bytes"]
    part = f" (part {cfg.shard_index} of {cfg.num_shards}: {written:,} of {doc_index:,})" if cfg.num_shards > 1 else ""
    log(f"data: {manifest['train']['tokens']:,} train / {manifest['val']['tokens']:,} val tokens from "
        f"{doc_index:,} documents{part} ({stats.summary()}), {mb / 1e6 / max(manifest['seconds'], 1e-9):.1f} MB/s "
        f"-> {out}")
    return manifest
