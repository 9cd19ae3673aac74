"""Who may use the service: the token (a bearer header or the page's session cookie),
the refusal to listen beyond loopback without one, and the security headers."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request, Response

from ..errors import ConfigError

LOOPBACK_HOSTS: frozenset[str] = frozenset({"127.0.0.1", "::1", "localhost"})
SESSION_COOKIE = "ctscreen_session"
#: Paths that answer without the token (health checks, the login form, static files).
PUBLIC_PATHS: frozenset[str] = frozenset({"/healthz", "/readyz", "/ui/login"})


def check_listen_address(host: str, token: str) -> None:
    """Refuse to listen beyond loopback without a token.

    Raises:
        ConfigError: ``host`` is not a loopback address and no token is set.
    """
    if host not in LOOPBACK_HOSTS and not token:
        raise ConfigError(
            f"--host {host} lets other machines reach the service, so it needs a token: "
            "set --token or the CTSCREEN_TOKEN environment variable (e.g. "
            "CTSCREEN_TOKEN=$(openssl rand -hex 32))."
        )


def session_value(token: str) -> str:
    """The session cookie's value for ``token`` (a MAC of it, not the token itself)."""
    return hmac.new(token.encode(), b"ctscreen-session-v1", hashlib.sha256).hexdigest()


def authorised(request: Request, token: str) -> bool:
    """The request carries ``token`` (always True when the service has none)."""
    if not token:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value(token).encode())


def security_headers(response: Response, path: str) -> None:
    """Headers every answer carries (no sniffing, no framing, a content policy)."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if not path.startswith("/docs"):
        # The report embeds its pictures as data: URLs and carries its own <style>.
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "frame-ancestors 'none'",
        )


def is_public(path: str, method: str) -> bool:
    """The route answers without the token."""
    return path in PUBLIC_PATHS or path.startswith("/static/") or (path == "/" and method == "GET")
