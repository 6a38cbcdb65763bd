"""`chatforge serve`: an OpenAI-compatible HTTP API (and a web chat page) over the batching engine.

This module holds the command's options and runs the app (app.py, FastAPI) on uvicorn over a socket it
binds itself, so that `--port 0` prints the real port. Safe by default: binds 127.0.0.1; optional bearer
API key on /v1; Host and Origin checks against DNS rebinding and cross-site pages (guard.py); JSON-only
POST bodies of at most 1 MiB, read under --request-timeout; at most --max-connections connections (more
get 503); strict request parsing with 4xx errors in OpenAI's shape; 503 + Retry-After when the engine's
queue is full; and a client that goes away has its request cancelled at once.
"""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass, field

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from chatforge.config import option
from chatforge.engine import Engine, EngineOptions
from chatforge.errors import ChatforgeError
from chatforge.serve.app import make_app
from chatforge.serve.guard import LOOPBACK_NAMES


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
    allowed_hosts: list[str] = option([], "also answer requests whose Host header names NAME (a DNS name this "
                                          "server is reached by; '*' = any); others get 421", metavar="NAME")
    allowed_origins: list[str] = option([], "let web pages from ORIGIN (e.g. https://app.example) call the server "
                                            "from a browser (CORS; '*' = any); others get 403", metavar="ORIGIN")
    max_connections: int = option(256, "open connections at once; more get 503", min=1, metavar="N")
    request_timeout: float = option(30.0, "seconds a client may take to send a request's headers, and again its "
                                          "body; slower ones are cut off", min=0.0, exclusive_min=True,
                                    metavar="SECONDS")
    engine: EngineOptions = field(default_factory=EngineOptions)


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for a request's headers, which uvicorn lacks: a client
    trickling its headers byte by byte would otherwise hold a connection forever."""

    header_timeout = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete and self._deadline is not None:
            self._deadline.cancel()  # the headers are in: the app's body deadline takes over
            self._deadline = None

    def on_response_complete(self) -> None:
        if self._deadline is None:  # the next request on this connection gets its own deadline
            self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


class _Server(uvicorn.Server):
    """Announces the address once it accepts connections (tests and scripts wait for that line)."""

    banner = ""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            print(self.banner, flush=True)


def _listen(host: str, port: int) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(cfg: ServeConfig) -> None:
    api_key = cfg.api_key or os.environ.get("CHATFORGE_API_KEY")
    try:  # before loading the model: a taken port fails at once
        sock = _listen(cfg.host, cfg.port)
    except OSError as err:
        raise ChatforgeError(f"cannot listen on {cfg.host}:{cfg.port} ({err.strerror or err})") from None
    engine = Engine(cfg.model, max_batch=cfg.max_batch, max_queue=cfg.max_queue, **cfg.engine.engine_kwargs())
    name = cfg.model_name or os.path.basename(os.path.abspath(cfg.model))
    app = make_app(engine, name, api_key, allowed_hosts=[*cfg.allowed_hosts, cfg.host],
                   allowed_origins=cfg.allowed_origins, body_timeout=cfg.request_timeout)
    logs = copy.deepcopy(LOGGING_CONFIG)
    logs["loggers"]["uvicorn.error"]["level"] = "WARNING"  # no start-up chatter; warnings and errors only
    logs["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout is for the banner (a pipe nobody drains)
    protocol = type("Protocol", (_Protocol,), {"header_timeout": cfg.request_timeout})
    server = _Server(uvicorn.Config(app, http=protocol, lifespan="off", log_config=logs,
                                    access_log=os.environ.get("CHATFORGE_QUIET") != "1",
                                    limit_concurrency=cfg.max_connections, backlog=1024, timeout_keep_alive=5,
                                    timeout_graceful_shutdown=3, server_header=False))
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    server.banner = f"chatforge: serving {name} on http://{url_host}:{bound_port}  (web chat at /, API at /v1)"
    if cfg.host not in LOOPBACK_NAMES and not api_key:
        print("chatforge: warning: listening beyond this machine without --api-key", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then passes Ctrl-C on
        pass
    finally:
        sock.close()
        engine.close()
