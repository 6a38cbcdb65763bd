"""Generated ids to text, incrementally, and stop strings.

Text reaches the caller as soon as it is printable: a character split over two byte-level tokens is
held back until complete, and so is text that may be the beginning of a stop string.
"""

from __future__ import annotations

import codecs
from typing import Callable


class Detokenizer:
    """The text of one request's generated ids, decoding only what is new at each step."""

    def __init__(self, token_bytes: list[bytes] | None, decode: Callable[[list[int]], str]):
        self.token_bytes, self.decode = token_bytes, decode
        self.read_off = 0                    # ids already turned into text
        self.prefix_off, self.prefix_text = 0, ""  # the tokenizer path's decoding window (as in vLLM)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # the byte-level path

    def add(self, out: list[int], final: bool) -> str:
        """The text that the ids in `out` past the last call make printable (all of it when `final`)."""
        table = self.token_bytes
        if table is not None:  # byte-level BPE: token bytes through an incremental UTF-8 decoder
            new_ids, self.read_off = out[self.read_off:], len(out)
            return self.utf8.decode(b"".join(table[t] if t < len(table) else b"" for t in new_ids), final)
        new = self.decode(out[self.prefix_off:])
        if len(new) > len(self.prefix_text) and (final or not new.endswith("\ufffd")):
            text = new[len(self.prefix_text):]
            self.prefix_off, self.read_off = self.read_off, len(out)
            self.prefix_text = self.decode(out[self.prefix_off:self.read_off])
            return text
        return ""


def byte_table(tok) -> list[bytes] | None:
    """Each token id's bytes for a byte-level BPE tokenizer (special tokens: none), so streaming text costs
    a table lookup per token instead of a tokenizer.decode() call; None for other tokenizers."""
    from tokenizers import decoders

    from chatforge.text.tokenizer import byte_decoder

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel) \
            or getattr(tok, "clean_up_tokenization_spaces", False):
        return None
    byte_of = byte_decoder()
    vocab = tok.get_vocab()
    special = set(tok.all_special_ids)
    added = set(tok.added_tokens_decoder)
    table = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        if i in special:
            continue
        if i in added:
            table[i] = token.encode()
            continue
        try:
            table[i] = bytes(byte_of[c] for c in token)
        except KeyError:
            return None
    return table


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the earliest stop string begins, searching text that may contain a new match."""
    hits = [i for s in stops if s for i in [text.find(s, max(0, start - len(s) + 1))] if i >= 0]
    return min(hits) if hits else None


def hold_back_stop_prefix(text: str, stops: list[str], emitted: int) -> int:
    """How far text may be emitted without showing the beginning of a stop string still being written.
    Only the text not yet emitted can be held back (what was emitted held no stop's beginning then), so a
    token costs the length of that tail, not of the text or of the stop strings."""
    safe = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - emitted), 0, -1):
            if text[-k] == s[0] and text.endswith(s[:k]):
                safe = min(safe, len(text) - k)
                break
    return max(safe, emitted)

