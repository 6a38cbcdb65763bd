"""`chatforge serve`: an OpenAI-compatible HTTP API (and a web chat page) over the batching engine.

Standard library only (`http.server` with one thread per connection): handlers validate a request,
submit it to the engine's bounded queue and copy its text to the client, as one JSON body or as
server-sent events. The engine thread batches all running requests. Safe by default: binds 127.0.0.1,
optional bearer API key on /v1, a request body limit, 4xx errors in OpenAI's shape for bad input, 503 +
Retry-After when the queue is full, and a client that goes away has its request cancelled at once.
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import select
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from chatforge.engine import Engine, EngineBusy, SamplingParams
from chatforge.errors import ChatforgeError

MAX_BODY = 1 << 20  # bytes
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
    if prompt_len >= context_length:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; this model's context window is "
                            f"{context_length}", param="messages", code="context_length_exceeded")
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


# ---------------------------------------------------------------- the HTTP handler


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a socket may stall (slow or stuck clients never hold a thread forever)
    server_version = "chatforge"
    engine: Engine
    model_name: str
    api_key: str | None
    max_body: int = MAX_BODY

    def log_message(self, fmt, *args) -> None:  # one short line per request, on stderr
        if os.environ.get("CHATFORGE_QUIET") != "1":
            super().log_message(fmt, *args)

    # -------------------------------------------------------- plumbing

    def _send(self, status: int, payload, content_type="application/json", headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        try:
            path = self.path.split("?", 1)[0]
            routes = {("GET", "/"): self._page, ("GET", "/health"): self._health,
                      ("GET", "/v1/models"): self._models, ("POST", "/v1/chat/completions"): self._chat,
                      ("POST", "/v1/completions"): self._completions}
            handler = routes.get((method, path))
            if handler is None:
                known = {p for _, p in routes}
                if path in known:
                    raise ApiError(405, f"{method} is not allowed on {path}")
                raise ApiError(404, f"no route {method} {path}")
            if path.startswith("/v1/"):
                self._authorize()
            handler()
        except ApiError as err:  # the body may be unread: answer and close rather than parse it as a request
            self._send(err.status, err.body(), headers={**err.headers, "Connection": "close"})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as err:  # a bug, not the client's fault: answer 500 rather than drop the connection
            self.close_connection = True
            self.log_error("internal error: %r", err)
            try:
                self._send(500, {"error": {"message": "internal server error", "type": "server_error",
                                           "param": None, "code": None}})
            except OSError:
                pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _authorize(self) -> None:
        if not self.api_key:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode())):
            raise ApiError(401, "missing or invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def _json_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            length = int(length)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if length < 0:
            raise ApiError(400, "bad Content-Length")
        if length > self.max_body:
            if length <= 16 * self.max_body:  # drain it so the client reads our answer, not a reset
                while length > 0:
                    length -= len(self.rfile.read(min(length, 1 << 16)) or b"x" * length)
            raise ApiError(413, f"request body over {self.max_body} bytes")
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _client_gone(self) -> bool:
        """True when the client closed its end (a readable socket with nothing to read)."""
        try:
            poll = select.poll()  # not select(): that fails on descriptors above 1023
            poll.register(self.connection, select.POLLIN | select.POLLHUP)
            if not poll.poll(0):
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -------------------------------------------------------- routes

    def _page(self) -> None:
        page = resources.files("chatforge").joinpath("static/index.html").read_bytes()
        self._send(200, page, "text/html; charset=utf-8", {"Cache-Control": "no-cache"})

    def _health(self) -> None:
        active, waiting = self.engine.load
        self._send(200, {"status": "ok", "model": self.model_name, "active": active, "waiting": waiting})

    def _models(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                     "owned_by": "chatforge"}]})

    def _chat(self) -> None:
        body = self._json_body()
        messages = parse_messages(body)
        try:
            prompt = self.engine.chat_prompt(messages)
        except Exception as err:  # a template that rejects this conversation
            raise ApiError(400, f"cannot format these messages: {err}", param="messages") from None
        self._generate(body, prompt, chat=True)

    def _completions(self) -> None:
        body = self._json_body()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        self._generate(body, self.engine.encode(prompt), chat=False)

    def _generate(self, body: dict, prompt: list[int], chat: bool) -> None:
        stream = _get(body, "stream", bool, False)
        options = _get(body, "stream_options", dict, {})
        include_usage = bool(options.get("include_usage"))
        params = parse_sampling(body, len(prompt), self.engine.context_length)
        try:
            req = self.engine.submit(prompt, params)
        except EngineBusy as err:
            raise ApiError(503, f"server busy: {err}; retry shortly", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except ChatforgeError as err:
            raise ApiError(400, str(err)) from None
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": self.model_name}
        try:
            if stream:
                self._stream(req, meta, chat, include_usage)
            else:
                self._whole(req, meta, chat)
        finally:
            req.cancel()  # frees the slot at once if the client went away; no-op when finished

    def _events(self, req):
        """The request's (kind, value) events, ending early if the client disconnects."""
        checked = time.monotonic()
        while True:
            try:
                kind, value = req.events.get(timeout=0.1)
            except queue.Empty:
                kind = None
            if time.monotonic() - checked > 0.1 or kind is None:  # at most ~10 polls a second
                checked = time.monotonic()
                if self._client_gone():
                    raise ConnectionResetError("client disconnected")
            if kind is None:
                continue
            yield kind, value
            if kind != "text":
                return

    def _usage(self, req) -> dict:
        return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
                "total_tokens": req.prompt_tokens + req.completion_tokens}

    def _whole(self, req, meta: dict, chat: bool) -> None:
        text = []
        for kind, value in self._events(req):
            if kind == "text":
                text.append(value)
            elif kind == "error":
                self._send(500, {"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                return
        text = "".join(text)
        choice = {"index": 0, "finish_reason": req.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        self._send(200, {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                         "usage": self._usage(req)})

    def _stream(self, req, meta: dict, chat: bool, include_usage: bool) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

        def send(choices: list, **extra) -> None:
            chunk = {**meta, "object": obj, "choices": choices, **extra}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()

        def choice(text: str | None, finish=None, role=False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

        usage = {"usage": None} if include_usage else {}
        if chat:
            send([choice(None, role=True)], **usage)
        for kind, value in self._events(req):
            if kind == "text":
                send([choice(value)], **usage)
            elif kind == "error":
                self.wfile.write(b"data: " + json.dumps({"error": {"message": value, "type": "server_error"}})
                                 .encode() + b"\n\n")
        if req.error is None:
            send([choice(None, finish=req.finish_reason)], **usage)
            if include_usage:
                send([], usage=self._usage(req))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


# ---------------------------------------------------------------- entry points


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                model_name: str = "chatforge") -> ThreadingHTTPServer:
    handler = type("ChatforgeHandler", (Handler,), {"engine": engine, "api_key": api_key, "model_name": model_name})
    return _Server((host, port), handler)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: socketserver's default of 5 drops bursts of new clients


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, model_name: str | None = None, dtype: str = "auto",
          static: bool | None = None) -> None:
    if not 0 <= port < 65536:
        raise ChatforgeError(f"--port must be in 0..65535, got {port}")
    engine = Engine(model_dir, max_batch=max_batch, max_queue=max_queue, dtype=dtype, static=static)
    name = model_name or os.path.basename(os.path.abspath(model_dir))
    try:
        server = make_server(engine, host, port, api_key, name)
    except OSError as err:
        raise ChatforgeError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    bound_host, bound_port = server.server_address[:2]
    print(f"chatforge: serving {name} on http://{bound_host}:{bound_port}  (web chat at /, API at /v1)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print("chatforge: warning: listening beyond this machine without --api-key", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
