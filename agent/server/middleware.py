"""The two middlewares every HTTP server of ours uses: JSON errors and bearer-token auth.

`serve` (the frontends) and `serve-model` differ only in how an error body looks — `{"error":
reason}` for the agent's API, OpenAI's `{"error": {"message", "type", "code"}}` for the model
server — so each passes its own `Render`; the rules (which statuses, which reasons, which paths
need no token, how a token is compared) are here once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# status, reason, code (a short machine-readable name: "not_found", "invalid_api_key", …), headers
Render = Callable[[int, str, str, dict[str, str]], web.Response]
# Probes (liveness, readiness, health) answer without a token: orchestrators send none.
PROBES = frozenset({"/livez", "/readyz", "/healthz"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="voice-agent"'}
Identify = Callable[[str], str | None]  # a presented token → whose it is (None: refused)
IDENTITY = web.RequestKey("identity", str)  # who the request's token belongs to


def json_errors(render: Render, too_large: str = "request body too large",
                quiet: tuple[type[BaseException], ...] = ()) -> Any:
    """Every 4xx/5xx an aiohttp handler raises, and every bug, answered through `render`: a bug
    answers 500 (logged), never a dropped connection. `quiet`: exceptions passed on as they are
    (besides cancellation), e.g. a client that left."""
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reasons = {404: f"no such endpoint: {request.path}",
                       405: f"method {request.method} is not allowed on {request.path}", 413: too_large}
            return render(exc.status, reasons.get(exc.status) or exc.text or exc.reason,
                          exc.reason.lower().replace(" ", "_"), {})
        except asyncio.CancelledError:
            raise
        except quiet:
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            return render(500, f"internal error: {type(exc).__name__}", "internal_error", {})

    return errors


def bearer_auth(token: str | Identify | None, render: Render, public: Collection[str] = PROBES,
                query_token_methods: Collection[str] = ()) -> Any:
    """`Authorization: Bearer <token>` on every path but `public` (and CORS preflights);
    with `query_token_methods` (e.g. GET: browsers cannot set headers on page loads and
    WebSockets) `?token=` too. No token configured: everything passes. `token` is one token, or
    a function naming who a presented token belongs to (None: nobody); the name is stored as
    `request[IDENTITY]` (several clients, each its own, as the model server's tenants)."""
    identify = token if callable(token) else _one_token(token) if token else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if identify is None or request.path in public or request.method == "OPTIONS":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        given: str | None = header[7:].strip() if header[:7].lower() == "bearer " else None
        if given is None and request.method in query_token_methods:
            given = request.query.get("token")
        if not given:
            return render(401, "missing bearer token: send 'Authorization: Bearer <token>'", "invalid_api_key",
                          dict(CHALLENGE))
        who = identify(given)
        if who is None:
            return render(401, "invalid bearer token", "invalid_api_key", dict(CHALLENGE))
        request[IDENTITY] = who
        return await handler(request)

    return auth


def _one_token(token: str) -> Identify:
    expected = token.encode()
    return lambda given: "" if hmac.compare_digest(raw_bytes(given), expected) else None


def raw_bytes(text: str) -> bytes:
    """Bytes to compare, for any header: aiohttp decodes a non-UTF-8 byte as a lone
    surrogate, which plain `.encode()` refuses (that was a 500 before authentication).
    Such a value can never equal a UTF-8 token, so `surrogatepass` is enough."""
    return text.encode("utf-8", "surrogatepass")
