"""Which web pages may reach the server: Host and Origin checks, and CORS for the origins let in.

Any web page the user opens can make the browser send requests to 127.0.0.1 in two ways. Cross-origin
requests carry the page's site in the Origin header: one that is neither this server's own origin nor in
--allowed-origins gets 403 (preflights included), before any route runs. DNS rebinding points the page's
own host name at 127.0.0.1, so the browser sees a same-origin request, but the Host header still names
the attacker's domain: a Host that is not a loopback name, an IP address (a rebinding needs a name) or in
--allowed-hosts gets 421. Origins let in get CORS headers on every answer.
"""

from __future__ import annotations

import ipaddress
import json

from chatforge.serve.openai import ApiError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
CORS_METHODS = b"GET, POST, OPTIONS"
CORS_HEADERS = b"Authorization, Content-Type"


def host_name(host: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware around the app: refuses foreign Hosts and Origins, answers CORS preflights."""

    def __init__(self, app, allowed_hosts=(), allowed_origins=()):
        self.app = app
        self.any_host, self.any_origin = "*" in allowed_hosts, "*" in allowed_origins
        self.hosts = LOOPBACK_NAMES | {host_name(h) for h in allowed_hosts}
        self.origins = {o.strip().lower().rstrip("/") for o in allowed_origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "").strip().lower()
        name = host_name(host)
        # no Host at all: not a browser (they always send one), so not a rebinding
        if host and not (self.any_host or name in self.hosts or _is_ip(name)):
            # as the client sent it (a name in Chinese too): from the raw header, before lower() changed its bytes
            shown = headers.get("host", "").strip().encode("latin-1").decode("utf-8", "replace")
            return await _answer(send, 421, _error(421, f"this server does not answer to Host {shown!r}; "
                                                        "start it with --allowed-hosts NAME to allow a name"))
        origin = headers.get("origin")
        # same origin: the page this server serves (either scheme: a TLS proxy may sit in front)
        foreign = origin is not None and origin.strip().lower().split("://", 1)[-1].rstrip("/") != host
        if foreign and not (self.any_origin or origin.strip().lower().rstrip("/") in self.origins):
            return await _answer(send, 403, _error(403, f"cross-origin requests from {origin!r} are refused; "
                                                        "start the server with --allowed-origins ORIGIN to allow one"))
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")] if foreign else []
        if scope["method"] == "OPTIONS":
            if "access-control-request-method" in headers:
                cors += [(b"access-control-allow-methods", CORS_METHODS),
                         (b"access-control-allow-headers", CORS_HEADERS), (b"access-control-max-age", b"600")]
            return await _answer(send, 204, b"", [(b"allow", CORS_METHODS), *cors])
        if not cors:
            return await self.app(scope, receive, send)

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _error(status: int, message: str) -> bytes:
    return json.dumps(ApiError(status, message).body()).encode()


async def _answer(send, status: int, body: bytes, headers=()) -> None:
    # a refusal may leave the request's body unread: close rather than parse it as the next request
    framing = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")] if body else []
    await send({"type": "http.response.start", "status": status, "headers": [*framing, *headers]})
    await send({"type": "http.response.body", "body": body})
