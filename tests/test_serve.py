"""`chatforge serve` for real: the official openai client, every bad request's 4xx, API key, disconnects, 503."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import pytest

from conftest import ENV

KEY = "test-key-123"


def start_server(model_dir: str, *flags) -> tuple[subprocess.Popen, str]:
    """Run `python -m chatforge serve MODEL --port 0 ...` and return (process, base URL) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", model_dir, "--port", "0", *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**ENV, "CHATFORGE_QUIET": "1"})
    line = proc.stdout.readline()  # "chatforge: serving NAME on http://127.0.0.1:PORT ..."
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}")
    return proc, line.split("http://")[1].split()[0]


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(base_model_dir):
    proc, addr = start_server(base_model_dir, "--api-key", KEY)
    yield addr
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def request(addr: str, method: str, path: str, body=None, key: str | None = KEY, headers: dict | None = None):
    """(status, headers (case-insensitive), parsed JSON body) of one raw HTTP request."""
    host, port = addr.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, resp.headers, json.loads(raw) if raw else None


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


# ---------------------------------------------------------------- the openai client, unchanged


def test_openai_chat(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "Hello!"}],
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_stream(client):
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story"}],
                                            max_completion_tokens=16, temperature=0.8, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 16
    # same seed, not streamed: same text
    again = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story"}],
                                           max_tokens=16, temperature=0.8, seed=3)
    assert again.choices[0].message.content == text


def test_openai_completions_and_models(client):
    r = client.completions.create(model="m", prompt="The cat", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 10
    pieces = [c.choices[0].text for c in client.completions.create(model="m", prompt="The cat", max_tokens=10,
                                                                     temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == r.choices[0].text
    assert [m.id for m in client.models.list().data] == ["run"]


def test_stop_and_max_tokens_capped(server):
    status, _, r = request(server, "POST", "/v1/completions", {"prompt": "The", "max_tokens": 10_000, "temperature": 0})
    assert status == 200 and r["usage"]["total_tokens"] <= 128  # capped to the context window
    text = r["choices"][0]["text"]
    if len(text) > 6:
        stop = text[3:6]
        status, _, s = request(server, "POST", "/v1/completions",
                               {"prompt": "The", "max_tokens": 10_000, "temperature": 0, "stop": stop})
        assert s["choices"][0]["text"] == text[:text.find(stop)] and s["choices"][0]["finish_reason"] == "stop"


def test_health_and_page_need_no_key(server):
    status, _, body = request(server, "GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok"
    host, port = server.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 200 and b"<html" in resp.read() and "text/html" in resp.getheader("Content-Type")


# ---------------------------------------------------------------- bad requests: 4xx, OpenAI-style


BAD = [
    ("malformed JSON", "POST", "/v1/chat/completions", b"{not json", 400),
    ("not an object", "POST", "/v1/chat/completions", [1, 2], 400),
    ("no messages", "POST", "/v1/chat/completions", {"max_tokens": 5}, 400),
    ("messages not a list", "POST", "/v1/chat/completions", {"messages": "hi"}, 400),
    ("unknown role", "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("role not a string", "POST", "/v1/chat/completions", {"messages": [{"role": ["user"], "content": "hi"}]}, 400),
    ("role an object", "POST", "/v1/chat/completions", {"messages": [{"role": {"a": 1}, "content": "hi"}], "stream": True},
     400),
    ("content not text", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("max_tokens 0", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400),
    ("max_tokens string", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": "5"}, 400),
    ("max_tokens bool", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": True}, 400),
    ("temperature string", "POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400),
    ("temperature too high", "POST", "/v1/chat/completions", {**CHAT, "temperature": 9}, 400),
    ("top_p 0", "POST", "/v1/chat/completions", {**CHAT, "top_p": 0}, 400),
    ("repetition_penalty tiny", "POST", "/v1/chat/completions", {**CHAT, "repetition_penalty": 1e-300}, 400),
    ("repetition_penalty over 100", "POST", "/v1/completions", {"prompt": "Hi", "repetition_penalty": 100.5}, 400),
    ("stop not strings", "POST", "/v1/chat/completions", {**CHAT, "stop": [1]}, 400),
    ("stream not bool", "POST", "/v1/chat/completions", {**CHAT, "stream": "yes"}, 400),
    ("n 2", "POST", "/v1/chat/completions", {**CHAT, "n": 2}, 400),
    ("prompt too long", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hello world " * 300}]}, 400),
    ("completion prompt missing", "POST", "/v1/completions", {"max_tokens": 5}, 400),
    ("completion prompt too long", "POST", "/v1/completions", {"prompt": "hello world " * 300}, 400),
    ("megabyte prompt too long", "POST", "/v1/completions", {"prompt": "你好 hello " * 40_000}, 400),
    ("megabyte chat too long", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "你好 hello " * 20_000}] * 2}, 400),
    ("body too large", "POST", "/v1/chat/completions", b"{" + b" " * (2 << 20) + b"}", 413),
    ("unknown route", "GET", "/v1/nothing", None, 404),
    ("wrong method", "GET", "/v1/chat/completions", None, 405),
]


@pytest.mark.parametrize("name,method,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, name, method, path, body, status):
    got, _, err = request(server, method, path, body)
    assert got == status, err
    assert set(err["error"]) >= {"message", "type", "param", "code"} and err["error"]["message"]
    if name.endswith("too long"):
        assert err["error"]["code"] == "context_length_exceeded"
        assert err["error"]["param"] == ("prompt" if path == "/v1/completions" else "messages")
    if name.startswith("repetition_penalty"):  # the API's field name, not the command line's flag
        assert err["error"]["param"] == "repetition_penalty" and "'repetition_penalty'" in err["error"]["message"]


@pytest.mark.parametrize("key", [None, "wrong"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/models"])
def test_api_key_enforced(server, key, path):
    get = path == "/v1/models"
    status, _, err = request(server, "GET" if get else "POST", path, None if get else CHAT, key=key)
    assert status == 401 and err["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------- slots: disconnects and a full queue


@pytest.fixture(scope="module")
def slow_server(never_stopping_model_dir):
    """One slot, one queue place, and a random model with a 4096-token window that never emits a stop token:
    a long request holds the slot for seconds unless it is cancelled."""
    proc, addr = start_server(never_stopping_model_dir, "--max-batch", 1, "--max-queue", 1)
    yield addr
    stop_server(proc)


def open_stream(addr: str, max_tokens: int = 4000):
    """A raw streaming request; returns (socket, file) after the status line and headers. HTTP/1.0, so that
    the events come unchunked, one per line."""
    host, port = addr.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    body = json.dumps({"prompt": "Once", "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.0\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (addr.encode(), len(body), body))
    f = sock.makefile("rb")
    assert f.readline().startswith(b"HTTP/1.1 200")
    while f.readline() not in (b"\r\n", b""):
        pass
    return sock, f


def hang_up(sock, f) -> None:
    f.close()
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def wait_idle(addr: str, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if request(addr, "GET", "/health", key=None)[2]["active"] == 0:
            return True
        time.sleep(0.02)
    return False


def test_disconnect_frees_the_slot(slow_server):
    sock, f = open_stream(slow_server)
    assert f.readline().startswith(b"data: ")
    assert request(slow_server, "GET", "/health", key=None)[2]["active"] == 1
    hang_up(sock, f)
    assert wait_idle(slow_server, within=1.0)
    start = time.time()
    status, _, r = request(slow_server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 5}, key=None)
    assert status == 200 and r["usage"]["completion_tokens"] == 5 and time.time() - start < 5


def test_disconnect_while_waiting_for_a_whole_answer(slow_server):
    host, port = slow_server.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    body = json.dumps({"prompt": "Once", "max_tokens": 4000, "temperature": 0}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (slow_server.encode(), len(body), body))
    deadline = time.time() + 5
    while request(slow_server, "GET", "/health", key=None)[2]["active"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    assert wait_idle(slow_server, within=1.0)


def test_a_waiting_client_that_leaves_gives_up_its_place(slow_server):
    running = open_stream(slow_server)
    assert running[1].readline().startswith(b"data: ")
    hang_up(*open_stream(slow_server))  # queued behind the running request, then gone
    deadline = time.time() + 5
    while request(slow_server, "GET", "/health", key=None)[2]["waiting"] and time.time() < deadline:
        time.sleep(0.02)
    assert request(slow_server, "GET", "/health", key=None)[2]["waiting"] == 0
    queued = open_stream(slow_server)  # its place is free: 200, not 503, while the slot is still busy
    health = request(slow_server, "GET", "/health", key=None)[2]
    assert health["active"] == 1 and health["waiting"] == 1
    for sock, f in (running, queued):
        hang_up(sock, f)
    assert wait_idle(slow_server, within=2.0)


def test_no_queue_still_serves_free_slots(base_model_dir):
    """--max-queue 0: no request waits, but one that a free slot takes at once is served; a key that is
    not ASCII works as sent (the header's UTF-8 bytes)."""
    key = "密钥-key"
    proc, addr = start_server(base_model_dir, "--max-queue", 0, "--api-key", key)
    try:
        host, port = addr.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Hi", "max_tokens": 3}).encode(),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}".encode()})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] >= 1
        conn.close()
        assert request(addr, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3}, key="wrong")[0] == 401
    finally:
        stop_server(proc)


def test_full_queue_is_503_with_retry_after(slow_server):
    running = open_stream(slow_server)
    assert running[1].readline().startswith(b"data: ")
    waiting = open_stream(slow_server)  # its 200 arrives once it is queued
    status, headers, err = request(slow_server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 5}, key=None)
    assert status == 503 and headers.get("Retry-After") and err["error"]["code"] == "overloaded"
    for sock, f in (running, waiting):
        hang_up(sock, f)
    assert wait_idle(slow_server, within=2.0)
