"""Read records from every kind of source a user may point `--data` at.

A *source spec* is a string: a file, a directory, a glob, `hf:NAME[:CONFIG]` (a Hub dataset, only
downloaded because the user named it) or `demo[:LANG]` (the chatterbot-corpus dialogues that ship as a
PyPI dependency). Every reader streams: nothing larger than one record (or one .txt document) is held
in memory, so corpora larger than RAM pass through.

Records come out as `(record, origin)` where `record` is a dict and `origin` is "file:line" (or
"file:record N"), so that every later error can name the place it came from. Problems that the user
must fix raise `ChatforgeError`; problems that may be skipped are counted in `SourceStats`.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from chatforge.config import option
from chatforge.errors import ChatforgeError, check_hub_reachable
from chatforge.outputs import is_pattern

TEXT_SUFFIXES = (".txt", ".md", ".text")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
COMPRESSED_SUFFIXES = (".gz", ".zst")

DEMO_LANGUAGES = {
    "en": "english", "zh": "chinese", "zh-tw": "traditionalchinese", "de": "german", "fr": "french",
    "es": "spanish", "it": "italian", "pt": "portuguese", "ru": "russian", "ja": "japanese",
    "ko": "korean", "tr": "turkish", "id": "indonesian", "hi": "hindi", "bn": "bengali",
    "nl": "dutch", "sv": "swedish", "uk": "ukrainian", "he": "hebrew", "fa": "persian",
    "ta": "tamil", "te": "telugu", "th": "thai", "ur": "urdu", "yo": "yoruba", "mr": "marathi",
}


@dataclass
class SourceOptions:
    """Where the text comes from and how to read it: shared by `tokenizer train`, `data prepare` and
    `pretrain`, which extend it."""

    data: list[str] = option([], "text source, repeatable: file, folder, glob, .gz/.zst, hf:NAME[:CONFIG], "
                                 "demo[:LANG]", metavar="SRC")
    text_field: str = option("text", "JSON/Parquet/CSV field holding the text", metavar="NAME")
    doc_per_line: bool = option(False, ".txt files hold one document per line")
    strict: bool = option(False, "fail on the first invalid UTF-8 line or skipped record")

    def sources(self) -> "SourceOptions":
        """Just the source options of a config that extends this class."""
        return SourceOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SourceOptions)})


@dataclass
class SourceStats:
    """Counts of everything read or skipped, reported at the end of a run (never dropped silently)."""

    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    invalid_utf8_lines: int = 0

    def skip(self, reason: str, origin: str, strict: bool) -> None:
        if strict:
            raise ChatforgeError(f"{origin}: {reason} (--strict)")
        self.skipped[reason] += 1

    def summary(self) -> str:
        parts = [f"{self.records} records read"]
        parts += [f"{n} skipped ({reason})" for reason, n in sorted(self.skipped.items())]
        if self.invalid_utf8_lines:
            parts.append(f"{self.invalid_utf8_lines} lines with invalid UTF-8 decoded with replacement")
        return ", ".join(parts)


def _is_supported_file(path: str) -> bool:
    name = path.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES)


def resolve_files(spec: str) -> list[str]:
    """Expand a file/directory/glob spec to a sorted list of readable files, or raise."""
    if not spec.strip():
        raise ChatforgeError("--data: an empty source name")
    if is_pattern(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise ChatforgeError(f"{spec}: the pattern matches no files")
        return files
    path = Path(spec)
    if not path.exists():
        raise ChatforgeError(f"{spec}: no such file or directory")
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _is_supported_file(str(p))
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ChatforgeError(f"{spec}: the directory holds no .txt/.jsonl/.json/.parquet/.csv files")
        return files
    return [str(path)]


def _open_binary(path: str):
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    if path.lower().endswith(".zst"):
        return io.BufferedReader(_ZstdFile(path))
    return open(path, "rb")


class _ZstdFile(io.RawIOBase):
    """A .zst file as a stream whose truncation is an error (zstandard's stream_reader ends quietly)."""

    def __init__(self, path: str):
        self._file, self._pending, self._out = open(path, "rb"), b"", b""
        self._frame = self._new_frame()

    @staticmethod
    def _new_frame():
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            chunk = self._pending or self._file.read(1 << 16)
            self._pending = b""
            if not chunk:
                if not self._frame.eof and self._frame_started:
                    raise EOFError("the compressed stream ends in the middle of a frame")
                return 0
            if self._frame.eof:  # concatenated frames: the next one starts here
                self._frame = self._new_frame()
            self._frame_started = True
            self._out = self._frame.decompress(chunk)
            if self._frame.eof:
                self._pending, self._frame_started = self._frame.unused_data, False
        n = min(len(buffer), len(self._out))
        buffer[:n], self._out = self._out[:n], self._out[n:]
        return n

    _frame_started = False

    def close(self) -> None:
        self._file.close()
        super().close()


BOM = b"\xef\xbb\xbf"


def _decode(raw: bytes, origin: str, stats: SourceStats, strict: bool, first: bool = True) -> str:
    """`raw` as text; invalid UTF-8 replaced and counted (an error under --strict). `first`: the file's first
    line or all of it, where a byte-order mark (Windows editors write one) is not text, and UTF-16 is refused."""
    if first:
        raw = raw.removeprefix(BOM)
        nuls = raw[:200].count(b"\x00")  # UTF-16 without a mark: every other byte of Latin text (one NUL: text)
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (nuls >= 2 and nuls > len(raw[:200]) // 4):
            raise ChatforgeError(f"{origin}: looks like UTF-16 text (a UTF-16 byte-order mark or NUL bytes between "
                                 "the characters); chatforge reads UTF-8: convert it, e.g. iconv -f UTF-16 -t UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if strict:
            raise ChatforgeError(f"{origin}: invalid UTF-8 ({err.reason})") from None
        stats.invalid_utf8_lines += 1
        return raw.decode("utf-8", errors="replace")


def _iter_lines(path: str, stats: SourceStats, strict: bool) -> Iterator[tuple[str, str]]:
    with _open_binary(path) as handle:
        for lineno, raw in enumerate(handle, 1):
            yield _decode(raw, f"{path}:{lineno}", stats, strict, lineno == 1).rstrip("\r\n"), f"{path}:{lineno}"


def _loads(text: str, origin: str, stats: SourceStats, strict: bool, whole_file: bool = False):
    """json.loads with its failures as one line naming `origin` (and the line, for a `whole_file`). A lone
    surrogate escape ("\\ud800"), which no tokenizer takes, is invalid text like invalid UTF-8: replaced and
    counted (an error under --strict)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{origin}:{err.lineno}" if whole_file else origin
        raise ChatforgeError(f"{where}: malformed JSON ({err.msg})") from None
    except RecursionError:
        raise ChatforgeError(f"{origin}: JSON nested too deeply") from None
    if LONE_SURROGATE_ESCAPE.search(text) and has_lone_surrogate(data):  # the regex first: it is cheap
        if strict:
            raise ChatforgeError(f"{origin}: a lone surrogate escape, not text")
        stats.invalid_utf8_lines += 1
        dumped = json.dumps(data, ensure_ascii=False)
        data = json.loads(dumped.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))  # one U+FFFD each
    return data


# a \u escape of a UTF-16 surrogate that is not half of a pair (or, rarely, an escaped backslash before "ud800")
LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                                   r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def has_lone_surrogate(data) -> bool:
    """Whether parsed JSON holds a lone UTF-16 surrogate ("\\ud800" parses to one): no UTF-8 encoder, and
    so no tokenizer, takes it."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def jsonl_records(path: str, stats: SourceStats, strict: bool) -> Iterator[tuple[dict, str]]:
    """The JSON objects of a JSON-lines file (compressed or not), each with its "file:line"; blank lines
    are skipped, anything else that is not an object is an error naming its line."""
    for line, origin in _iter_lines(path, stats, strict):
        if not line.strip():
            continue
        record = _loads(line, origin, stats, strict)
        if not isinstance(record, dict):
            raise ChatforgeError(f"{origin}: expected a JSON object, got {type(record).__name__}")
        yield record, origin


def _base_suffix(path: str) -> str:
    name = path.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return os.path.splitext(name)[1]


def _read_file(path: str, doc_per_line: bool, stats: SourceStats, strict: bool) -> Iterator[tuple[dict, str]]:
    suffix = _base_suffix(path)
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_jsonl(path)):
        yield from jsonl_records(path, stats, strict)
    elif suffix == ".json":
        with _open_binary(path) as handle:
            data = _loads(_decode(handle.read(), path, stats, strict), path, stats, strict, whole_file=True)
        if isinstance(data, dict):  # {"data": [records]} or a single record
            only = list(data.values())[0] if len(data) == 1 else None
            data = only if isinstance(only, list) and all(isinstance(r, dict) for r in only) else [data]
        if not isinstance(data, list):
            raise ChatforgeError(f"{path}: expected a JSON list of objects")
        for index, record in enumerate(data):
            if not isinstance(record, dict):
                raise ChatforgeError(f"{path}: record {index}: expected a JSON object")
            yield record, f"{path}: record {index}"
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise ChatforgeError(f"{path}: not a readable Parquet file ({err})") from None
        index = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield record, f"{path}: row {index}"
                index += 1
    elif suffix == ".csv":
        csv.field_size_limit(2**31 - 1)  # a document is one field: the default 128k characters is too few
        with _open_binary(path) as handle:  # newline="": lines end at \n, \r\n or \r and keep it (quoted fields)
            text = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
            lines = (_decode(line.encode("utf-8", "surrogateescape"), f"{path}:{lineno}", stats, strict, lineno == 1)
                     for lineno, line in enumerate(text, 1))  # the undecodable bytes back, handled as _decode does
            reader = csv.DictReader(lines)
            try:
                for index, record in enumerate(reader):
                    if None in record or None in record.values():  # fields past the header's, or fewer than it
                        stats.skip("CSV row whose fields do not match the header", f"{path}:{reader.line_num}", strict)
                        continue
                    yield record, f"{path}: row {index + 2}"
            except csv.Error as err:
                raise ChatforgeError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    elif doc_per_line:
        for line, origin in _iter_lines(path, stats, strict):
            yield {"text": line}, origin
    else:
        with _open_binary(path) as handle:
            yield {"text": _decode(handle.read(), path, stats, strict)}, path


def _read_readable(path: str, doc_per_line: bool, stats: SourceStats, strict: bool) -> Iterator[tuple[dict, str]]:
    """`_read_file`, with a corrupt or truncated file (a bad .gz/.zst, a read error) as one clear error."""
    import zlib

    import zstandard

    try:
        yield from _read_file(path, doc_per_line, stats, strict)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as err:
        raise ChatforgeError(f"{path}: cannot read the file, it may be corrupt or truncated "
                             f"({type(err).__name__}: {err})") from None


def _looks_like_jsonl(path: str) -> bool:
    """A .json file whose first line is a complete object is read line by line (streaming)."""
    with _open_binary(path) as handle:
        first = handle.readline().removeprefix(BOM).strip()
    if not first.startswith(b"{"):
        return False
    try:
        json.loads(first)
        return True
    except ValueError:
        return False


def demo_dir() -> Path:
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).parent / "data"


def _read_demo(lang: str | None) -> Iterator[tuple[dict, str]]:
    """Each chatterbot-corpus dialogue becomes one record {"dialogue": [turn, turn, ...]}."""
    import yaml

    root = demo_dir()
    if lang is None:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    else:
        folder = root / DEMO_LANGUAGES.get(lang, lang)
        if not folder.is_dir():
            known = ", ".join(sorted(DEMO_LANGUAGES))
            raise ChatforgeError(f"demo:{lang}: unknown demo language (known: {known})")
        folders = [folder]
    for folder in folders:
        for path in sorted(folder.glob("*.yml")):
            with open(path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle) or {}
            for index, turns in enumerate(data.get("conversations") or []):
                turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
                if turns:
                    yield {"dialogue": turns}, f"{path}: dialogue {index}"


def _read_hub(spec: str) -> Iterator[tuple[dict, str]]:
    import datasets

    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise ChatforgeError(f"{spec}: expected hf:NAME[:CONFIG]")
    if not os.path.exists(name):  # hf:./folder: a dataset saved on this machine
        check_hub_reachable(spec, "hf: sources stream from the Hub (a downloaded copy: give its files as --data)")
    try:
        dataset = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as err:  # network, missing dataset, bad config: all user-fixable
        raise ChatforgeError(f"{spec}: could not load the Hub dataset ({err})") from None
    for index, record in enumerate(dataset):
        yield dict(record), f"{spec}: record {index}"


def iter_records(specs: Iterable[str], *, doc_per_line: bool = False, strict: bool = False,
                 stats: SourceStats | None = None) -> Iterator[tuple[dict, str]]:
    """Yield every record of every source, in a deterministic order."""
    stats = stats if stats is not None else SourceStats()
    specs = list(specs)
    if not specs:
        raise ChatforgeError("no --data given")
    for spec in specs:
        if spec == "demo" or spec.startswith("demo:"):
            records = _read_demo(spec.partition(":")[2] or None)
        elif spec.startswith("hf:"):
            records = _read_hub(spec)
        else:
            records = (item for path in resolve_files(spec)
                       for item in _read_readable(path, doc_per_line, stats, strict))
        for record, origin in records:
            stats.records += 1
            yield record, origin


def record_text(record: dict, origin: str, text_field: str) -> str:
    """The text of a pretraining record: its `text_field`, or a demo dialogue's turns one per line."""
    if "dialogue" in record and text_field not in record:
        return "\n".join(record["dialogue"])
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise ChatforgeError(f"{origin}: no '{text_field}' field (fields: {fields}); use --text-field")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ChatforgeError(f"{origin}: field '{text_field}' is {type(value).__name__}, expected text")
    return value


def iter_texts(src: SourceOptions, stats: SourceStats | None = None) -> Iterator[str]:
    """Yield the non-empty documents of the sources; empty ones are counted as skipped."""
    stats = stats if stats is not None else SourceStats()
    for record, origin in iter_records(src.data, doc_per_line=src.doc_per_line, strict=src.strict, stats=stats):
        text = record_text(record, origin, src.text_field)
        if not text.strip():
            stats.skip("empty document", origin, strict=False)
            continue
        yield text


def describe_sources(specs: Iterable[str]) -> list[dict]:
    """A fingerprint of the inputs (paths, sizes, mtimes) used to decide whether cached shards are stale."""
    described = []
    for spec in specs:
        if spec == "demo" or spec.startswith("demo:") or spec.startswith("hf:"):
            described.append({"spec": spec})
            continue
        files = [{"path": os.path.abspath(p), "size": os.path.getsize(p), "mtime": os.path.getmtime(p)}
                 for p in resolve_files(spec)]
        described.append({"spec": spec, "files": files})
    return described
