"""Stage 7: talk to a chat model in the terminal, with tokens streaming as they are generated.

History that outgrows the context window loses its oldest exchanges first; the system prompt stays.
"""

from __future__ import annotations

import sys

from chatforge.engine import Engine, SamplingParams
from chatforge.errors import ChatforgeError

HELP = "commands: /reset (forget the conversation), /exit (quit)"


def fit_history(engine: Engine, messages: list[dict], reserve: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest user/assistant exchanges until the prompt leaves `reserve` tokens to answer in."""
    messages = list(messages)
    while True:
        ids = engine.chat_prompt(messages)
        if len(ids) + reserve <= engine.context_length:
            return messages, ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:  # only the newest user turn is left
            if len(ids) < engine.context_length:
                return messages, ids
            raise ChatforgeError(f"the message is {len(ids)} tokens; the context window is {engine.context_length}")
        del messages[first:first + 2]


def reply(engine: Engine, messages: list[dict], params: SamplingParams, out=sys.stdout) -> tuple[str, list[dict]]:
    """Stream one assistant answer to `out`; return it and the (possibly trimmed) history."""
    reserve = min(params.max_new_tokens, engine.context_length // 4)
    messages, ids = fit_history(engine, messages, reserve)
    pieces = []
    for piece in engine.stream(ids, params):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(pieces), messages


def chat_loop(engine: Engine, params: SamplingParams, system: str | None = None) -> None:
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    print(f"chatting with {engine.name} ({HELP})")
    while True:
        try:
            text = input("\n>>> ").strip()
        except EOFError:
            print()
            return
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(base)
            print("(conversation reset)")
            continue
        if text.startswith("/"):
            print(HELP)
            continue
        messages.append({"role": "user", "content": text})
        answer, messages = reply(engine, messages, params)
        messages.append({"role": "assistant", "content": answer})
