"""`chatforge serve` under abuse: foreign Hosts and Origins, hostile bodies, slow clients, a poisoned request.

Real servers on loopback; every wait is bounded in time.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time

import pytest
from test_serve import request, start_server, stop_server

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ALLOWED = "http://example.test"


@pytest.fixture(scope="module")
def guarded(base_model_dir):
    """Defaults, but a 2 s request deadline and 8 connections, so slow clients and floods show quickly."""
    proc, addr = start_server(base_model_dir, "--request-timeout", 2, "--max-connections", 8)
    yield addr
    stop_server(proc)


@pytest.fixture(scope="module")
def cors_server(base_model_dir):
    proc, addr = start_server(base_model_dir, "--allowed-origins", ALLOWED)
    yield addr
    stop_server(proc)


def idle(addr: str) -> bool:
    health = request(addr, "GET", "/health", key=None)[2]
    return health["active"] == 0 and health["waiting"] == 0


def raw_connection(addr: str) -> socket.socket:
    host, port = addr.split(":")
    return socket.create_connection((host, int(port)), timeout=10)


# ---------------------------------------------------------------- Host and Origin


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example"])
def test_foreign_host_is_refused(guarded, host):
    status, _, err = request(guarded, "GET", "/health", key=None, headers={"Host": host})
    assert status == 421 and err["error"]["message"]
    status, _, _ = request(guarded, "POST", "/v1/chat/completions", CHAT, headers={"Host": host})
    assert status == 421 and idle(guarded)


@pytest.mark.parametrize("host", ["例子.com", "bücher.de", "пример.рф"])
def test_foreign_host_is_named_as_sent(guarded, host):
    status, _, err = request(guarded, "GET", "/health", key=None, headers={"Host": host.encode()})
    assert status == 421 and f"'{host}'" in err["error"]["message"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_loopback_hosts_are_answered(guarded, host):
    port = guarded.split(":")[1]
    assert request(guarded, "GET", "/health", key=None, headers={"Host": f"{host}:{port}"})[0] == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/json"])
@pytest.mark.parametrize("origin", ["http://evil.example", "null"])
def test_foreign_origin_post_is_refused(guarded, content_type, origin):
    body = json.dumps({**CHAT, "max_tokens": 100}).encode()
    status, _, err = request(guarded, "POST", "/v1/chat/completions", body,
                             headers={"Origin": origin, "Content-Type": content_type})
    assert status == 403 and "origin" in err["error"]["message"].lower()
    assert idle(guarded)  # nothing was generated


def test_same_origin_post_works(guarded):
    status, headers, r = request(guarded, "POST", "/v1/chat/completions", CHAT, headers={"Origin": f"http://{guarded}"})
    assert status == 200 and r["object"] == "chat.completion"
    assert "Access-Control-Allow-Origin" not in headers  # same origin: no CORS needed


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_post_must_be_json(guarded, content_type):
    hdrs = {"Content-Type": content_type} if content_type else {"Content-Type": ""}
    status, _, err = request(guarded, "POST", "/v1/completions", json.dumps({"prompt": "Hi"}).encode(), headers=hdrs)
    assert status == 415 and "application/json" in err["error"]["message"]
    assert idle(guarded)


def test_preflight_for_unknown_origin_is_refused(guarded):
    status, headers, _ = request(guarded, "OPTIONS", "/v1/chat/completions", key=None,
                                 headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers


def test_cors_for_an_allowed_origin(cors_server):
    status, headers, _ = request(cors_server, "OPTIONS", "/v1/chat/completions", key=None,
                                 headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in headers["Access-Control-Allow-Methods"]
    allowed = headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    status, headers, r = request(cors_server, "POST", "/v1/chat/completions", CHAT, headers={"Origin": ALLOWED})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ALLOWED and r["choices"]
    assert request(cors_server, "POST", "/v1/chat/completions", CHAT, headers={"Origin": "http://evil.example"})[0] == 403


# ---------------------------------------------------------------- hostile bodies: always a 4xx


HOSTILE = [
    ("deep array", "/v1/chat/completions", b"[" * 100_000),
    ("deep field", "/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("huge seed", "/v1/chat/completions", json.dumps({**CHAT, "seed": 2**64}).encode()),
    ("negative seed", "/v1/chat/completions", json.dumps({**CHAT, "seed": -1}).encode()),
    ("surrogate prompt", "/v1/completions", b'{"prompt": "Hi \\ud800 there", "max_tokens": 4}'),
    ("surrogate message", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("NaN", "/v1/completions", b'{"prompt": "Hi", "temperature": NaN}'),
    ("Infinity", "/v1/completions", b'{"prompt": "Hi", "top_p": Infinity}'),
    ("1e999", "/v1/completions", b'{"prompt": "Hi", "repetition_penalty": 1e999}'),
    ("huge integer", "/v1/completions", b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}"),
    ("bad UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe"}'),
]


@pytest.mark.parametrize("name,path,body", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_body_is_a_4xx(guarded, name, path, body):
    status, _, err = request(guarded, "POST", path, body)
    assert status == 400 and err["error"]["type"] == "invalid_request_error", err
    assert idle(guarded)


UNSUPPORTED = [("logprobs", True), ("top_logprobs", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]),
               ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("response_format", {"type": "json_object"}),
               ("n", 2)]


@pytest.mark.parametrize("field,value", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_field_is_named(guarded, field, value):
    status, _, err = request(guarded, "POST", "/v1/chat/completions", {**CHAT, field: value})
    assert status == 400 and err["error"]["param"] == field and f"'{field}'" in err["error"]["message"]


def test_harmless_values_of_unsupported_fields_are_accepted(guarded):
    body = {**CHAT, "logprobs": False, "top_logprobs": None, "response_format": {"type": "text"}, "n": 1, "tools": []}
    assert request(guarded, "POST", "/v1/chat/completions", body)[0] == 200


def test_tiny_temperature_is_fine(guarded):
    status, _, r = request(guarded, "POST", "/v1/completions", {"prompt": "The", "max_tokens": 6, "temperature": 1e-300})
    assert status == 200 and r["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------- slow clients and floods


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server ended the connection within `seconds`, what it sent)."""
    sock.settimeout(seconds)
    got, deadline = b"", time.time() + seconds
    try:
        while time.time() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got
    return False, got


def test_slow_body_is_cut_off(guarded):
    sock = raw_connection(guarded)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": " % guarded.encode())
    start = time.time()
    assert request(guarded, "GET", "/health", key=None)[0] == 200 and time.time() - start < 1  # others go on
    closed, got = closed_within(sock, 6)
    sock.close()
    assert closed and got.startswith(b"HTTP/1.1 408") and time.time() - start < 6


def test_slow_headers_are_cut_off(guarded):
    sock = raw_connection(guarded)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\n" % guarded.encode())
    start = time.time()
    for _ in range(3):  # trickling: a byte now and then is not enough
        time.sleep(0.5)
        sock.sendall(b"X")
    assert request(guarded, "GET", "/health", key=None)[0] == 200
    closed, _ = closed_within(sock, 6)
    sock.close()
    assert closed and time.time() - start < 6


def status_of(addr: str, path: str) -> int:
    """The status alone: uvicorn's own 503 has a plain-text body."""
    import http.client

    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def test_too_many_connections_get_503(guarded):
    held = [raw_connection(guarded) for _ in range(8)]
    try:
        time.sleep(0.2)  # let the server accept them all
        assert status_of(guarded, "/health") == 503
    finally:
        for sock in held:
            sock.close()
    deadline = time.time() + 5
    while status_of(guarded, "/health") != 200:
        assert time.time() < deadline
        time.sleep(0.1)


# ---------------------------------------------------------------- one poisoned request among healthy ones


def stream_chat(addr: str, results: queue.Queue) -> None:
    """One streaming chat; puts (saw [DONE], usage or None, error events) on `results`."""
    import http.client

    host, port = addr.split(":")
    done, usage, errors = False, None, []
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 24, "temperature": 0.8,
                "stream": True, "stream_options": {"include_usage": True}}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        for raw in resp:
            line = raw.strip()
            if line == b"data: [DONE]":
                done = True
                break
            if line.startswith(b"data: "):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if "error" in chunk:
                    errors.append(chunk["error"])
        conn.close()
    finally:
        results.put((done, usage, errors))


def test_poisoned_request_among_healthy_streams(guarded):
    results: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=stream_chat, args=(guarded, results), daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    # while they run: hostile requests, and a stream whose client vanishes mid-answer
    for _, path, body in HOSTILE[:3]:
        assert request(guarded, "POST", path, body)[0] == 400
    assert request(guarded, "POST", "/v1/completions",
                   {"prompt": "Hi", "max_tokens": 8, "temperature": 1e-300, "seed": 2**64 - 1})[0] == 200
    sock = raw_connection(guarded)
    body = json.dumps({"prompt": "Once", "max_tokens": 100, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (guarded.encode(), len(body), body))
    sock.recv(100)
    sock.close()
    outcomes = [results.get(timeout=120) for _ in threads]
    for done, usage, errors in outcomes:
        assert done and not errors and usage
    # sampled: one stream may draw a stop token first; three at once all doing so would be a failure
    assert any(usage["completion_tokens"] >= 1 for _, usage, _ in outcomes)
    deadline = time.time() + 5
    while not idle(guarded):
        assert time.time() < deadline
        time.sleep(0.05)


# ---------------------------------------------------------------- an engine error fails its request alone


class FakeRequest:
    """What the engine hands back: events, then the request's results."""

    def __init__(self, events):
        self.events, self.cancelled = queue.Queue(), threading.Event()
        for e in events:
            self.events.put(e)
        self.error = next((v for k, v in events if k == "error"), None)
        self.finish_reason = None if self.error else "stop"
        self.prompt_tokens, self.completion_tokens = 3, 2

    def cancel(self):
        self.cancelled.set()


class FakeEngine:
    """Fails every request whose prompt says 'poison'; answers the others."""

    context_length, load = 128, (0, 0)

    def encode(self, text):
        return [1, 2, 3] if "poison" not in text else [9, 9, 9]

    def least_tokens(self, text):
        return 0

    def submit(self, prompt, params, on_event=None):
        bad = prompt == [9, 9, 9]
        req = FakeRequest([("text", "par"), ("error", "generation failed: boom")] if bad
                          else [("text", "ok"), ("text", "!"), ("done", "stop")])
        on_event()  # its events are all queued already
        return req


def call(app, body: dict) -> tuple[int, bytes]:
    """(status, body) of one POST /v1/completions through the ASGI app, in-process."""
    import asyncio

    sent, data = [], json.dumps(body).encode()
    messages = [{"type": "http.request", "body": data, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())]}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_engine_error_fails_that_request_alone():
    from chatforge.serve.app import make_app

    app = make_app(FakeEngine())
    status, body = call(app, {"prompt": "poison", "max_tokens": 4})
    assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
    status, body = call(app, {"prompt": "poison", "max_tokens": 4, "stream": True})
    events = [json.loads(line[6:]) for line in body.split(b"\n\n") if line.startswith(b"data: {")]
    assert status == 200 and events[-1]["error"]["message"] == "generation failed: boom"
    assert body.endswith(b"data: [DONE]\n\n")
    status, body = call(app, {"prompt": "fine", "max_tokens": 4})
    assert status == 200 and json.loads(body)["choices"][0]["text"] == "ok!"
