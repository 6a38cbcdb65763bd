"""The OpenAI API's request parsing and error shape, independent of the HTTP server.

Every field is checked for type and range here: a bad request is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

from chatforge.engine import SamplingParams, check_context
from chatforge.errors import ChatforgeError

ROLES = {"system", "developer", "user", "assistant"}


class ApiError(Exception):
    """A client error answered as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request validation


def _get(body: dict, name: str, kinds, default=None, check=None, why: str = ""):
    """body[name] if it has one of `kinds` (bool is never a number) and passes `check`."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)) \
            or not isinstance(value, kinds) or (check and not check(value)):
        raise ApiError(400, f"'{name}' {why or 'has the wrong type'}", param=name)
    return value


def _text_content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of system, user, assistant; got {role!r}",
                           param="messages")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _text_content(m.get("content"), i)})
    return out


def parse_sampling(body: dict, prompt_len: int, context_length: int) -> SamplingParams:
    """OpenAI sampling fields -> SamplingParams, with max_tokens capped to what the context leaves."""
    try:
        check_context(prompt_len, context_length)
    except ChatforgeError as err:
        raise ApiError(400, str(err), param="messages", code="context_length_exceeded") from None
    room = context_length - prompt_len
    max_tokens = _get(body, "max_completion_tokens", int, None, lambda v: v >= 1, "must be an integer >= 1")
    max_tokens = _get(body, "max_tokens", int, max_tokens, lambda v: v >= 1, "must be an integer >= 1")
    n = _get(body, "n", int, 1, lambda v: v == 1, "must be 1 (one choice per request)")
    del n
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
    return SamplingParams(
        max_new_tokens=min(max_tokens or room, room),
        temperature=float(_get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]")),
        top_p=float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")),
        top_k=_get(body, "top_k", int, 0, lambda v: v >= 0, "must be an integer >= 0"),
        repetition_penalty=float(_get(body, "repetition_penalty", (int, float), 1.0, lambda v: v > 0, "must be > 0")),
        seed=_get(body, "seed", int, None),
        stop=[s for s in stop or [] if s])
