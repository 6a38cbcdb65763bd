"""The ASGI app behind `chatforge serve` (FastAPI): OpenAI-compatible routes over the batching engine.

Handlers run on the event loop. Tokenizing runs on a small thread pool (a long prompt must not stall the
loop); a request's text arrives by the engine thread waking its handler (`_waker`), so no thread waits
per request and no handler polls. A POST must be JSON (415 otherwise:
a cross-site form or text/plain "simple request" never reaches the engine); its body is read under a
deadline (408) and a size limit (413), parsed strictly (openai.py), submitted to the engine's bounded
queue (503 + Retry-After when full) and copied back as one JSON body or as server-sent events. A client
that goes away has its request cancelled at once, which frees its batch slot. Errors keep OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from chatforge.engine import Engine, EngineBusy
from chatforge.errors import ChatforgeError
from chatforge.serve.guard import Guard
from chatforge.serve.openai import (
    ApiError,
    body_field,
    parse_json,
    parse_messages,
    parse_sampling,
)

MAX_BODY = 1 << 20  # bytes
DRAIN = 16  # an oversized body up to DRAIN x MAX_BODY is read and dropped, so the client sees the 413
log = logging.getLogger("chatforge.serve")


def _json(status: int, payload: dict, headers: dict | None = None) -> Response:
    # json.dumps' defaults, not Starlette's compact JSON: the same bytes as chatforge always sent
    return Response(json.dumps(payload).encode(), status, headers, media_type="application/json")


def _error(err: ApiError) -> Response:
    # the body may be unread: close rather than parse it as the next request
    return _json(err.status, err.body(), {**err.headers, "Connection": "close"})


def _waker(loop: asyncio.AbstractEventLoop, ready: asyncio.Event):
    """A request's `on_event`: wakes its handler on the event loop from the engine thread (no thread per
    waiting request, no polling)."""

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(ready.set)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    return wake


class _Stream(StreamingResponse):
    """Server-sent events that cancel their request however the response ends (even before it starts)."""

    def __init__(self, req, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.req = req

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.req.cancel()  # frees the slot at once if the client went away; no-op when finished


class Api:
    """The routes' state: the engine, who may call, and the pool that tokenizes."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None, body_timeout: float,
                 max_body: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.body_timeout, self.max_body = body_timeout, max_body
        # the engine's tokenizer takes one caller at a time: two threads keep it busy
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="chatforge-tokenize")
        self.page = resources.files("chatforge.serve").joinpath("static/index.html").read_bytes()

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -------------------------------------------------------- requests in

    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")  # decoded as latin-1: .encode("latin-1") gives the bytes sent
        sent = given[7:].encode("latin-1")
        if not (given.startswith("Bearer ") and hmac.compare_digest(sent, self.api_key.encode())):
            raise ApiError(401, "missing or invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def json_body(self, request: Request) -> dict:
        self.authorize(request)
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "send the request body as JSON, with Content-Type: application/json")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > DRAIN * self.max_body:
            raise ApiError(413, f"request body over {self.max_body} bytes")
        try:
            raw = await asyncio.wait_for(self._read(request), self.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s") from None
        except ClientDisconnect:
            raise ApiError(400, "the client went away while sending the body") from None
        return parse_json(raw)

    async def _read(self, request: Request) -> bytes:
        """The body, holding at most max_body bytes in memory whatever the client sends."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= self.max_body:
                chunks.append(chunk)
            elif size > DRAIN * self.max_body:
                break
        if size > self.max_body:
            raise ApiError(413, f"request body over {self.max_body} bytes")
        return b"".join(chunks)

    # -------------------------------------------------------- routes

    async def chat(self, request: Request) -> Response:
        body = await self.json_body(request)
        messages = parse_messages(body)
        try:
            text = await self.off_loop(self.engine.chat_text, messages)
        except Exception as err:  # a template that rejects this conversation
            raise ApiError(400, f"cannot format these messages: {err}", param="messages") from None
        self.refuse_over_long(text, "messages")
        prompt = await self.off_loop(self.engine.chat_prompt, messages, text)
        return await self.generate(request, body, prompt, chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self.json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        self.refuse_over_long(prompt, "prompt")
        return await self.generate(request, body, await self.off_loop(self.engine.encode, prompt), chat=False)

    def refuse_over_long(self, text: str, field: str) -> None:
        """A prompt whose bytes alone prove it too long is refused before it is tokenized."""
        least = self.engine.least_tokens(text)
        if least >= self.engine.context_length:
            raise ApiError(400, f"the prompt is at least {least} tokens; this model's context window is "
                                f"{self.engine.context_length}", param=field, code="context_length_exceeded")

    async def generate(self, request: Request, body: dict, prompt: list[int], chat: bool) -> Response:
        stream = body_field(body, "stream", bool, False)
        include_usage = bool(body_field(body, "stream_options", dict, {}).get("include_usage"))
        params = parse_sampling(body, len(prompt), self.engine.context_length, "messages" if chat else "prompt")
        ready = asyncio.Event()
        try:
            req = self.engine.submit(prompt, params, on_event=_waker(asyncio.get_running_loop(), ready))
        except EngineBusy as err:
            raise ApiError(503, f"server busy: {err}; retry shortly", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except ChatforgeError as err:
            raise ApiError(400, str(err)) from None
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": self.model_name}
        if stream:  # Starlette cancels the stream when the client disconnects
            return _Stream(req, self.stream(req, ready, meta, chat, include_usage))
        watch = asyncio.create_task(self._cancel_on_disconnect(request, req, ready))
        try:
            return await self.whole(req, ready, meta, chat)
        finally:
            watch.cancel()
            req.cancel()

    @staticmethod
    async def _cancel_on_disconnect(request: Request, req, ready: asyncio.Event) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        req.cancel()
        ready.set()  # a request still queued has no event to wake its handler with

    @staticmethod
    async def events(req, ready: asyncio.Event):
        """The request's events, in lists of whatever arrived together, until its end (or its cancellation:
        whoever cancels also sets `ready`). One wake-up and one write per list, not per token: under load
        the event loop's time per write is time the engine thread cannot decode in."""
        while True:
            await ready.wait()
            ready.clear()  # before draining: an event put after the drain sets it again
            batch = []
            while not batch or batch[-1][0] == "text":
                try:
                    batch.append(req.events.get_nowait())
                except queue.Empty:
                    break
            if batch:
                yield batch
            if batch and batch[-1][0] != "text" or not batch and req.cancelled.is_set():
                return

    # -------------------------------------------------------- answers out

    @staticmethod
    def usage(req) -> dict:
        return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
                "total_tokens": req.prompt_tokens + req.completion_tokens}

    async def whole(self, req, ready: asyncio.Event, meta: dict, chat: bool) -> Response:
        text = []
        async for batch in self.events(req, ready):
            for kind, value in batch:
                if kind == "text":
                    text.append(value)
                elif kind == "error":  # this request failed alone; the others go on
                    return _json(500, ApiError(500, value).body())
        text = "".join(text)
        choice = {"index": 0, "finish_reason": req.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return _json(200, {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                           "usage": self.usage(req)})

    async def stream(self, req, ready: asyncio.Event, meta: dict, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(choices: list, **extra) -> bytes:
            return b"data: " + json.dumps({**meta, "object": obj, "choices": choices, **extra}).encode() + b"\n\n"

        def choice(text: str | None, finish=None, role=False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

        usage = {"usage": None} if include_usage else {}
        if chat:
            yield send([choice(None, role=True)], **usage)
        async for batch in self.events(req, ready):
            chunks = [send([choice(value)], **usage) if kind == "text" else
                      b"data: " + json.dumps({"error": {"message": value, "type": "server_error"}}).encode() + b"\n\n"
                      for kind, value in batch if kind in ("text", "error")]
            if chunks:
                yield b"".join(chunks)
        if req.error is None:
            yield send([choice(None, finish=req.finish_reason)], **usage)
            if include_usage:
                yield send([], usage=self.usage(req))
        yield b"data: [DONE]\n\n"


def make_app(engine: Engine, model_name: str = "chatforge", api_key: str | None = None, allowed_hosts=(),
             allowed_origins=(), body_timeout: float = 30.0, max_body: int = MAX_BODY) -> Guard:
    """The whole server as one ASGI app: the Host/Origin guard around the FastAPI routes."""
    api = Api(engine, model_name, api_key, body_timeout, max_body)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # no pages beyond the API and the chat

    @app.get("/")
    async def page() -> Response:
        return Response(api.page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> Response:
        active, waiting = engine.load
        return _json(200, {"status": "ok", "model": model_name, "active": active, "waiting": waiting})

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        api.authorize(request)
        return _json(200, {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                       "owned_by": "chatforge"}]})

    app.post("/v1/chat/completions")(api.chat)
    app.post("/v1/completions")(api.completions)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return _error(err)

    @app.exception_handler(HTTPException)  # Starlette's own: no such route, or the wrong method
    async def http_error(request: Request, err: HTTPException) -> Response:
        method, path = request.method, request.url.path
        message = {404: f"no route {method} {path}", 405: f"{method} is not allowed on {path}"}
        return _error(ApiError(err.status_code, message.get(err.status_code, str(err.detail))))

    @app.exception_handler(Exception)  # a bug, not the client's fault: a 500 in OpenAI's shape
    async def internal_error(request: Request, err: Exception) -> Response:
        log.error("internal error on %s %s: %r", request.method, request.url.path, err)
        return _error(ApiError(500, "internal server error"))

    return Guard(app, allowed_hosts, allowed_origins)
