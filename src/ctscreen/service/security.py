"""The refusal to listen beyond loopback without a token, the paths that answer without
one, and the security headers (who may do what: :mod:`ctscreen.service.roles`)."""

from __future__ import annotations

from fastapi import Response

from ..errors import ConfigError

LOOPBACK_HOSTS: frozenset[str] = frozenset({"127.0.0.1", "::1", "localhost"})
#: Paths that answer without the token (health checks, the login form, static files).
PUBLIC_PATHS: frozenset[str] = frozenset({"/healthz", "/readyz", "/ui/login"})


def check_listen_address(host: str, token: str, *, tokens_file: bool = False) -> None:
    """Refuse to listen beyond loopback without a token.

    Raises:
        ConfigError: ``host`` is not a loopback address and neither a token nor a
            tokens file is set.
    """
    if host not in LOOPBACK_HOSTS and not token and not tokens_file:
        raise ConfigError(
            f"--host {host} lets other machines reach the service, so it needs a token: "
            "set --token or the CTSCREEN_TOKEN environment variable (e.g. "
            "CTSCREEN_TOKEN=$(openssl rand -hex 32)), or --tokens FILE."
        )


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
