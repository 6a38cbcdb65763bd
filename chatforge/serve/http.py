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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from chatforge.config import option
from chatforge.engine import Engine, EngineBusy, EngineOptions
from chatforge.errors import ChatforgeError
from chatforge.serve.openai import ApiError, _get, parse_messages, parse_sampling

MAX_BODY = 1 << 20  # bytes


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
        page = resources.files("chatforge.serve").joinpath("static/index.html").read_bytes()
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


@dataclass
class ServeConfig:
    """`chatforge serve`: where to listen, who may call, how much load to take."""

    model: str = option(None, "model folder", positional=True, metavar="MODEL_DIR")
    host: str = option("127.0.0.1", "interface to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "TCP port (0 = any free port)", min=0, max=65535)
    api_key: str | None = option(None, "require Authorization: Bearer KEY on /v1 (default: $CHATFORGE_API_KEY "
                                       "if set)", metavar="KEY")
    max_batch: int = option(16, "requests decoded together", min=1, max=4096, metavar="N")
    max_queue: int = option(64, "requests allowed to wait; more get 503 + Retry-After", min=0, metavar="N")
    model_name: str | None = option(None, "model id in the API (default: MODEL_DIR's name)", metavar="NAME")
    engine: EngineOptions = field(default_factory=EngineOptions)


def serve(cfg: ServeConfig) -> None:
    api_key = cfg.api_key or os.environ.get("CHATFORGE_API_KEY")
    engine = Engine(cfg.model, max_batch=cfg.max_batch, max_queue=cfg.max_queue, **cfg.engine.engine_kwargs())
    name = cfg.model_name or os.path.basename(os.path.abspath(cfg.model))
    host, port = cfg.host, cfg.port
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
