"""Stage 1: train a byte-level BPE tokenizer with the chat tokens reserved from the start.

Byte-level BPE (the `tokenizers` library) means every UTF-8 string, Chinese, emoji or code, maps to
tokens with no unknown token. The special tokens are in the vocabulary before pretraining begins, so
pretraining and chat fine-tuning share one vocabulary and the embeddings never need resizing.

The saved directory is a plain Hugging Face tokenizer (tokenizer.json + tokenizer_config.json with a
ChatML `chat_template`); `AutoTokenizer.from_pretrained(DIR)` loads it with no chatforge import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from chatforge.config import option
from chatforge.errors import ChatforgeError, one_line, transformers_quiet
from chatforge.text.sources import SourceOptions

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]

# ChatML. The assistant's content and its closing <|im_end|> sit inside {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` (transformers, TRL) marks exactly the
# tokens the model must learn to produce, the end-of-turn token included: that is what makes it stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, and the special tokens


@dataclass
class TokenizerConfig(SourceOptions):
    """Settings of `chatforge tokenizer train`."""

    out: str = option("", "where to save the tokenizer directory", metavar="DIR")
    vocab_size: int = option(8192, "vocabulary size", min=MIN_VOCAB, max=2**31 - 1, metavar="N")
    max_chars: int = option(200_000_000, "train on at most N characters (bounds memory and time on large "
                                         "corpora)", min=1, metavar="N")
    min_frequency: int = option(2, "merge only pairs seen at least this often", min=1, metavar="N")

    def validate(self) -> None:
        if not self.out:
            raise ChatforgeError("tokenizer train needs --out DIR")


def train_tokenizer(cfg: TokenizerConfig, log=print):
    """Train, save to `cfg.out` and return the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from chatforge.text.sources import SourceStats, iter_texts

    from chatforge.outputs import check_not_inputs, check_replaceable, holds_only_listed

    check_not_inputs(cfg.out, [("--data", d) for d in cfg.data])
    check_replaceable(cfg.out, lambda folder: holds_only_listed(folder, "tokenizer", LEGACY_FILES))
    stats = SourceStats()
    used_chars = 0

    def sample():
        nonlocal used_chars
        for text in iter_texts(cfg, stats):
            if used_chars >= cfg.max_chars:
                return
            text = text[: cfg.max_chars - used_chars]
            used_chars += len(text)
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(sample(), trainer=trainer)
    if used_chars == 0:
        raise ChatforgeError(f"{', '.join(cfg.data)}: the corpus is empty ({stats.summary()})")
    if tok.get_vocab_size() < cfg.vocab_size:
        raise ChatforgeError(
            f"--vocab-size {cfg.vocab_size} is more than this corpus supports: it yields only "
            f"{tok.get_vocab_size()} tokens ({used_chars:,} characters); use --vocab-size {tok.get_vocab_size()} "
            "or less, or more data")
    hf_tok = wrap_tokenizer(tok)
    save_tokenizer(hf_tok, cfg.out, made_from={"data": cfg.data, "vocab_size": cfg.vocab_size,
                                               "text_field": cfg.text_field, "doc_per_line": cfg.doc_per_line})
    log(f"tokenizer: {tok.get_vocab_size()} tokens from {used_chars:,} characters ({stats.summary()}) -> {cfg.out}")
    return hf_tok


def wrap_tokenizer(tok):
    """A transformers fast tokenizer around a `tokenizers.Tokenizer`, with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], model_max_length=1_000_000,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


# what a tokenizer folder held before its marker listed the files (transformers' save_pretrained names)
LEGACY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "vocab.json", "merges.txt", "added_tokens.json")


def save_tokenizer(tok, out: str, made_from: dict | None = None) -> None:
    """Written to a temporary sibling, marked as chatforge's, then renamed into place."""
    from chatforge.outputs import mark_files, replace_with, temporary_sibling

    tmp = temporary_sibling(out)
    try:
        tok.save_pretrained(str(tmp))
        mark_files(tmp, "tokenizer", **(made_from or {}))
        replace_with(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was moved into place


def load_tokenizer(path: str):
    """Load any Hugging Face tokenizer directory (ours or a user's), with a clear error if it is not one."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ChatforgeError(f"{path}: tokenizer directory not found")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ChatforgeError(f"{path}: no tokenizer files (tokenizer.json): not a tokenizer or model folder "
                             "with its tokenizer")
    try:
        with transformers_quiet():
            tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises OSError/ValueError/... for non-tokenizer folders
        raise ChatforgeError(f"{path}: not a Hugging Face tokenizer directory ({one_line(err)})") from None
    if not getattr(tok, "is_fast", False):
        raise ChatforgeError(f"{path}: chatforge needs a fast (tokenizer.json) tokenizer")
    return tok


def ensure_chat_tokens(tok) -> int:
    """Give a foreign tokenizer the ChatML tokens, a pad token and our template; return tokens added."""
    vocab = tok.get_vocab()
    added = 0
    if IM_START not in vocab or IM_END not in vocab:
        added += tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]},
                                        replace_extra_special_tokens=False)
    if tok.pad_token is None:
        added += tok.add_special_tokens({"pad_token": PAD})
    if tok.eos_token is None:
        tok.eos_token = IM_END
    template = tok.chat_template or ""
    if IM_START not in template or "{% generation %}" not in template:
        tok.chat_template = CHAT_TEMPLATE  # ChatML with generation blocks, so assistant masks work
    return added


def stop_ids(tok, eos_token_id=None) -> list[int]:
    """The ids generation stops at: end of turn, end of document, the tokenizer's EOS and `eos_token_id`
    (a model's generation_config value, an id or a list), in that order without repeats."""
    vocab = tok.get_vocab()
    extra = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    ids = [vocab[t] for t in (IM_END, EOS) if t in vocab] + [tok.eos_token_id] + extra
    return list(dict.fromkeys(i for i in ids if i is not None))


def document_separator_id(tok) -> int:
    """The id placed between pretraining documents: <|endoftext|> if present, else the tokenizer's EOS."""
    vocab = tok.get_vocab()
    if EOS in vocab:
        return vocab[EOS]
    if tok.eos_token_id is None:
        raise ChatforgeError("the tokenizer has neither <|endoftext|> nor an EOS token to separate documents")
    return tok.eos_token_id


def fingerprint(tok) -> str:
    """A stable hash of the tokenizer's full definition (vocabulary, merges, normalisation, specials)."""
    payload = tok.backend_tokenizer.to_str()
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# GPT-2's pre-tokenizer pattern: what `pre_tokenizers.ByteLevel(use_regex=True)` splits on
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character standing for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def fast_batch_encoder(tok):
    """A batch encoder (list of texts -> list of id lists) running tiktoken's BPE over this tokenizer's own
    vocabulary, or None when the tokenizer is not a plain byte-level BPE (or tiktoken is missing).

    Why: tokenizing is most of `data prepare`'s time, and tiktoken's BPE is faster than `tokenizers`'
    `encode_batch_fast` on the same vocabulary (about 2x, bench/README.md).
    The result is the same ids: the same GPT-2 split pattern, the same vocabulary, and special tokens in
    the text still become their ids. tiktoken merges by the rank of the merged token where `tokenizers`
    follows its merge list; with ids assigned in merge order (as BPE training does, checked here) the
    two agree, and `data.prepare` re-checks a sample of every batch against `tokenizers`.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tok.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (spec.get("normalizer") or model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space")):
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    specials = {t["content"]: t["id"] for t in added}
    vocab = model["vocab"]
    last = -1
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = vocab.get(left + right)
        if merged is None or merged <= last:  # ids not in merge order: ranks would disagree
            return None
        last = merged
    byte_of = byte_decoder()
    try:
        ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token not in specials}
    except KeyError:
        return None
    encoding = tiktoken.Encoding("chatforge", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens=specials)
    threads = os.cpu_count() or 1
    allowed = encoding.special_tokens_set

    def encode_slice(texts: list[str]) -> list[list[int]]:
        return [encoding.encode(text, allowed_special=allowed) for text in texts]

    def encode_batch(texts: list[str]) -> list[list[int]]:
        # One task per thread, not tiktoken's `encode_batch` (one future per text): its per-future locking
        # cost as much as the encoding itself (bench/README.md).
        size = -(-len(texts) // threads)
        ids: list[list[int]] = []
        with ThreadPoolExecutor(threads, thread_name_prefix="chatforge-bpe") as pool:  # no threads outlive a batch
            for part in pool.map(encode_slice, [texts[i:i + size] for i in range(0, len(texts), size or 1)]):
                ids += part
        return ids

    return encode_batch
