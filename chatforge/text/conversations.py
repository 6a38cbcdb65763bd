"""Conversation records in every common format, normalised to OpenAI-style `messages`.

Detected per record: `messages` (role/content), ShareGPT `conversations` (from/value), Alpaca
(instruction/input/output), `prompt`/`completion`, and demo dialogues (alternating user/assistant).
A record that cannot become a valid conversation (unknown role, empty content, no assistant turn,
turns out of order) is counted under its reason, or with `--strict` is an error naming file and line.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from chatforge.text.sources import SourceStats, iter_records

ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant"}


class InvalidRecord(ValueError):
    """A record that is skipped (and counted) rather than trained on."""


def to_messages(record: dict) -> list[dict]:
    """Normalise one record; raise InvalidRecord(reason) if it is not a usable conversation."""
    if isinstance(record.get("messages"), list):
        turns = turns_of(record["messages"])
    elif isinstance(record.get("conversations"), list):
        turns = turns_of(record["conversations"])
    elif "instruction" in record and "output" in record:
        prompt = str(record.get("instruction") or "")
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        turns = [("system", record["system"])] if record.get("system") else []
        turns += [("user", prompt), ("assistant", record["output"])]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        turns = turns_of(prompt) if isinstance(prompt, list) else [("user", prompt)]
        turns += turns_of(completion) if isinstance(completion, list) else [("assistant", completion)]
    elif isinstance(record.get("dialogue"), list):
        turns = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(record["dialogue"])]
        if len(turns) % 2:  # a demo dialogue ending on the user's line: that last line has no answer
            turns = turns[:-1]
    else:
        raise InvalidRecord("unrecognised format (expected messages, conversations, instruction/output, "
                            "prompt/completion)")
    messages = messages_from(turns)
    check_order(messages)
    return messages


def messages_from(turns: list[tuple]) -> list[dict]:
    """(role, content) pairs in any of the formats' role names -> messages; InvalidRecord if one is not."""
    messages = []
    for role, content in turns:
        mapped = ROLES.get(str(role).lower()) if role is not None else None
        if mapped is None:
            raise InvalidRecord(f"unknown role {role!r}")
        content = plain_text(content)
        if content is None or not content.strip():
            raise InvalidRecord("empty content")
        messages.append({"role": mapped, "content": content})
    return messages


def prompt_length(tok, messages: list[dict]) -> int:
    """Tokens of `messages` through the chat template, ready for the answer."""
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])


def special_tokens_pattern(tok) -> re.Pattern:
    """Matches the text of any special token of `tok` (`<|im_end|>`, ...): built once per run, for
    `spells_special_token`."""
    specials = sorted((t.content for t in tok.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials)) or "(?!)")  # (?!) never matches


def spells_special_token(pattern: re.Pattern, messages: list[dict]) -> bool:
    """A message's content spells a special token. Templates tokenize such text as the token itself, so a training
    example would learn control tokens where text stood (a turn's end mid-answer, a forged turn), while chat and
    serve keep it as text (`Engine.chat_prompt`)."""
    return any(isinstance(m.get("content"), str) and pattern.search(m["content"]) for m in messages)


def plain_text(content) -> str | None:
    """A message's content as text: a string, or OpenAI's list of text parts joined; None for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def turns_of(items: list) -> list[tuple]:
    """A list of {role, content} or ShareGPT {from, value} dicts -> (role, content) pairs."""
    return [(m.get("role", m.get("from")), m.get("content", m.get("value"))) if isinstance(m, dict) else (None, None)
            for m in items]


def check_order(messages: list[dict]) -> None:
    """An optional system prompt, then user/assistant alternating, ending with the assistant."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in body):
        raise InvalidRecord("no assistant turn")
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise InvalidRecord("turns out of order")
    if body[-1]["role"] != "assistant":
        raise InvalidRecord("turns out of order")


def iter_conversations(specs: Iterable[str], strict: bool = False,
                       stats: SourceStats | None = None) -> Iterator[tuple[list[dict], str]]:
    """Yield (messages, origin) for every valid conversation; invalid ones are counted in `stats`."""
    return iter_valid(specs, to_messages, strict, stats)


def iter_valid(specs: Iterable[str], convert, strict: bool = False, stats: SourceStats | None = None) -> Iterator:
    """(convert(record), origin) for every record `convert` accepts; InvalidRecord ones are counted in
    `stats` under their reason (with `strict`: the first is an error naming file and line)."""
    stats = stats if stats is not None else SourceStats()
    for record, origin in iter_records(specs, strict=strict, stats=stats):
        try:
            yield convert(record), origin
        except InvalidRecord as err:
            stats.skip(str(err), origin, strict)
