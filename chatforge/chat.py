"""Stage 7: talk to a chat model in the terminal, with tokens streaming as they are generated.

History that outgrows the context window loses its oldest exchanges first; the system prompt stays.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from chatforge.config import option
from chatforge.engine import Engine, EngineOptions, SamplingParams, check_context

HELP = "commands: /reset (forget the conversation), /exit (quit)"


@dataclass
class GenerateConfig:
    """`chatforge generate`: continue a prompt with a (base) model."""

    model: str = option(None, "model folder", positional=True, metavar="MODEL_DIR")
    prompt: str = option("", "the text to continue")
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: EngineOptions = field(default_factory=EngineOptions)

    def validate(self) -> None:
        if not self.prompt:
            from chatforge.errors import ChatforgeError

            raise ChatforgeError("generate needs --prompt TEXT")


@dataclass
class ChatConfig:
    """`chatforge chat`: talk to a chat model in the terminal."""

    model: str = option(None, "model folder", positional=True, metavar="MODEL_DIR")
    system: str | None = option(None, "system prompt")
    prompt: str | None = option(None, "answer this one message, print the answer and exit")
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7))
    engine: EngineOptions = field(default_factory=EngineOptions)


def one_request_engine(cfg) -> Engine:
    """The engine of a command that runs one request at a time: one slot, so that `--dtype auto` picks the dtype
    by batch 1 alone, the only batch it runs (weighed with batch 16, bf16 can win there while fp32 decodes one
    request faster: mini on an AMX Xeon, bench/README.md)."""
    return Engine(cfg.model, max_batch=1, **cfg.engine.engine_kwargs())


def generate(cfg: GenerateConfig) -> None:
    with one_request_engine(cfg) as engine:  # its thread stopped before the interpreter exits
        print(cfg.prompt, end="", flush=True)
        for piece in engine.stream(engine.encode(cfg.prompt), cfg.sampling):
            print(piece, end="", flush=True)
        print()


def chat(cfg: ChatConfig) -> None:
    with one_request_engine(cfg) as engine:
        if cfg.prompt is None:
            chat_loop(engine, cfg.sampling, system=cfg.system)
            return
        messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
        reply(engine, messages + [{"role": "user", "content": cfg.prompt}], cfg.sampling)


def fit_history(engine: Engine, messages: list[dict], reserve: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest user/assistant exchanges until the prompt leaves `reserve` tokens to answer in."""
    messages = list(messages)
    while True:
        ids = engine.chat_prompt(messages)
        if len(ids) + reserve <= engine.context_length:
            return messages, ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:  # only the newest user turn is left
            check_context(len(ids), engine.context_length)
            return messages, ids
        del messages[first:first + 2]


def reply(engine: Engine, messages: list[dict], params: SamplingParams, out=None) -> tuple[str, list[dict]]:
    """Stream one assistant answer to `out` (default: the current sys.stdout); return it and the (possibly
    trimmed) history."""
    out = out or sys.stdout
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
    if sys.stdin is None:  # started with stdin closed (`<&-`): nothing to read, as at the end of input
        return
    while True:
        try:
            # a terminal that is not UTF-8 hands undecodable bytes over as lone surrogates: show them replaced
            text = input("\n>>> ").strip().encode("utf-8", "surrogateescape").decode("utf-8", "replace")
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
