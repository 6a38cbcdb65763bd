"""Preference records for `chatforge dpo`, in the common formats, as TRL's conversational form.

Detected per record:
- TRL's standard form: `prompt`, `chosen`, `rejected`, each a string or a list of messages;
- TRL's implicit prompt: `chosen` and `rejected` as whole conversations whose shared first turns are
  the prompt;
- ShareGPT preferences (as LLaMA-Factory documents them): `conversations` (from/value turns: the prompt)
  with `chosen` and `rejected` answers (a from/value turn, or a string).
Each becomes `{"prompt": [messages ending with the user's], "chosen": [the assistant's answer],
"rejected": [another answer]}`. A record that cannot (no answer, roles out of order, identical answers)
is counted under its reason, or with `--strict` is an error naming file and line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from chatforge.text.conversations import InvalidRecord, check_order, iter_valid, messages_from, turns_of
from chatforge.text.sources import SourceStats


def _messages(value, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return messages_from([(default_role, value)])
    if isinstance(value, dict):
        return messages_from(turns_of([value]))
    if isinstance(value, list):
        return messages_from(turns_of(value))
    raise InvalidRecord(f"expected a string or messages, got {type(value).__name__}")


def to_preference(record: dict) -> dict:
    """Normalise one record; raise InvalidRecord(reason) if it is not a usable preference pair."""
    if "chosen" not in record or "rejected" not in record:
        raise InvalidRecord("no chosen/rejected pair")
    if isinstance(record.get("conversations"), list):
        prompt = messages_from(turns_of(record["conversations"]))
    elif "prompt" in record:
        prompt = _messages(record["prompt"], "user")
    else:  # implicit prompt: the turns both conversations share
        chosen, rejected = _messages(record["chosen"], "assistant"), _messages(record["rejected"], "assistant")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, record = chosen[:shared], {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    chosen, rejected = _messages(record["chosen"], "assistant"), _messages(record["rejected"], "assistant")
    for answer in (chosen, rejected):
        if [m["role"] for m in answer] != ["assistant"]:
            raise InvalidRecord("an answer must be one assistant turn")
        check_order(prompt + answer)
    if chosen == rejected:
        raise InvalidRecord("chosen and rejected are the same")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def iter_preferences(specs: Iterable[str], strict: bool = False,
                     stats: SourceStats | None = None) -> Iterator[tuple[dict, str]]:
    """Yield (pair, origin) for every valid preference record; invalid ones are counted in `stats`."""
    return iter_valid(specs, to_preference, strict, stats)
