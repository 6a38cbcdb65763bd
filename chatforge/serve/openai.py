"""The OpenAI API's request parsing and error shape, independent of the HTTP server.

Every field is checked for type and range here: a bad request is a 4xx naming the field, never a 500.
The body is parsed strictly (no NaN or Infinity, no lone surrogates, bounded nesting), and a field this
server does not implement but that would change the answer (logprobs, tools, a JSON response format, n > 1)
is refused by name rather than silently ignored.
"""

from __future__ import annotations

import json
import math

from chatforge.engine import SamplingParams, check_context
from chatforge.engine.sampling import REPETITION_PENALTY_RANGE
from chatforge.errors import ChatforgeError
from chatforge.text.conversations import plain_text
from chatforge.text.sources import has_lone_surrogate

ROLES = {"system", "developer", "user", "assistant"}
# OpenAI fields this server does not implement -> the values that leave the answer unchanged (null aside)
UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",),
               "functions": ([],), "function_call": ("none",), "response_format": ({"type": "text"},),
               "logit_bias": ({},), "echo": (False,), "suffix": ("",), "best_of": (1,), "presence_penalty": (0,),
               "frequency_penalty": (0,)}


class ApiError(Exception):
    """A client error answered as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                500: "server_error", 503: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request validation


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError("number out of range")
    return value


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400: never a 500, whatever the bytes."""
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:  # '[[[[...' nested past Python's recursion limit
        raise ApiError(400, "the request body nests too deeply") from None
    except (ValueError, UnicodeDecodeError):  # int digit limits and bad UTF-8 included
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if has_lone_surrogate(body):
        raise ApiError(400, "the request body holds a lone UTF-16 surrogate (invalid Unicode)")
    return body


def reject_unsupported(body: dict) -> None:
    for name, harmless in UNSUPPORTED.items():
        value = body.get(name)
        # bool against bool: True == 1, yet 'best_of': true is not 'best_of': 1
        if value is not None and not any(value == h and isinstance(value, bool) == isinstance(h, bool)
                                         for h in harmless):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def body_field(body: dict, name: str, kinds, default=None, check=None, why: str = ""):
    """body[name] if it has one of `kinds` (bool is never a number) and passes `check`."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)) \
            or not isinstance(value, kinds) or (check and not check(value)):
        raise ApiError(400, f"'{name}' {why or 'has the wrong type'}", param=name)
    return value


def _text_content(content, i: int) -> str:
    text = plain_text(content)
    if text is None:
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
    return text


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of system, user, assistant; got {role!r}",
                           param="messages")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _text_content(m.get("content"), i)})
    return out


def parse_sampling(body: dict, prompt_len: int, context_length: int, prompt_field: str) -> SamplingParams:
    """OpenAI sampling fields -> SamplingParams, with max_tokens capped to what the context leaves;
    `prompt_field` ("messages" or "prompt") is what a too-long prompt's error names."""
    try:
        check_context(prompt_len, context_length)
    except ChatforgeError as err:
        raise ApiError(400, str(err), param=prompt_field, code="context_length_exceeded") from None
    room = context_length - prompt_len
    max_tokens = body_field(body, "max_completion_tokens", int, None, lambda v: v >= 1, "must be an integer >= 1")
    max_tokens = body_field(body, "max_tokens", int, max_tokens, lambda v: v >= 1, "must be an integer >= 1")
    reject_unsupported(body)
    body_field(body, "n", int, 1, lambda v: v == 1, "must be 1 (one choice per request)")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
    low, high = REPETITION_PENALTY_RANGE
    return SamplingParams(
        max_new_tokens=min(max_tokens or room, room),
        temperature=float(body_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]")),
        top_p=float(body_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")),
        top_k=body_field(body, "top_k", int, 0, lambda v: v >= 0, "must be an integer >= 0"),
        repetition_penalty=float(body_field(body, "repetition_penalty", (int, float), 1.0,
                                            lambda v: low <= v <= high, f"must be in [{low:g}, {high:g}]")),
        seed=body_field(body, "seed", int, None, lambda v: 0 <= v < 2**64, "must be an integer in [0, 2**64)"),
        stop=[s for s in stop or [] if s])
