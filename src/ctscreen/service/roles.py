"""Who may do what: tokens with roles, the page's session cookie, and the role each route
needs.

Three roles, each allowed what the one before it is:

- ``viewer``: read jobs, results, reports, the DICOM node's status, ``/metrics``;
- ``operator``: also upload studies and send the DICOM outbox again;
- ``admin``: also delete jobs and read the audit trail.

Tokens come from ``--tokens FILE``, one line per token: ``NAME ROLE SHA256`` (the hex
SHA-256 of the token; the file never holds a token itself), ``#`` starts a comment.
The single ``--token`` / ``$CTSCREEN_TOKEN`` is an ``admin`` token named ``admin``.
With no token at all (loopback only) every request is ``admin``. A token is checked
by comparing its hash with every entry's in constant time.

The page's session cookie is ``NAME:MAC``, the MAC a keyed hash (the server's key
``DATA/session.key``) of the name, role and token hash: it names who signed in,
holds no token, and stops working when the token's line changes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request

from ..errors import ConfigError

VIEWER = "viewer"
OPERATOR = "operator"
ADMIN = "admin"
#: The roles, least allowed first (each may do what the ones before it may).
ROLES: tuple[str, ...] = (VIEWER, OPERATOR, ADMIN)
#: The pseudo-role of the routes that answer anyone (health checks, the login form).
PUBLIC = "public"
SESSION_COOKIE = "ctscreen_session"
KEY_FILE = "session.key"
_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a token's name and role."""

    name: str
    role: str

    def may(self, role: str) -> bool:
        """This principal's role allows what ``role`` may do."""
        return role == PUBLIC or ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True)
class TokenEntry:
    """One token: its name, role and the SHA-256 of the token (32 bytes)."""

    name: str
    role: str
    digest: bytes


def token_digest(token: str) -> bytes:
    """The SHA-256 of a token's UTF-8 bytes."""
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, *, source: str = "--tokens") -> tuple[TokenEntry, ...]:
    """The entries of a tokens file.

    Raises:
        ConfigError: a line that is not ``NAME ROLE SHA256``, a role that is not one of
            :data:`ROLES`, or a name given twice.
    """
    entries: list[TokenEntry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        where = f"{source} line {number}"
        if len(parts) != 3:
            raise ConfigError(
                f"{where} has {len(parts)} fields; write NAME ROLE SHA256 (the token's hash, "
                'e.g. from: printf %s "$TOKEN" | sha256sum).'
            )
        name, role, digest = parts[0], parts[1].lower(), parts[2].lower().removeprefix("sha256:")
        if not _NAME.match(name):
            raise ConfigError(f"{where}: name {name!r} may hold letters, digits and ._@- only.")
        if role not in ROLES:
            raise ConfigError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}.")
        if not _HEX.match(digest):
            raise ConfigError(
                f"{where}: {parts[2][:12]!r}... is not a SHA-256 in hex (64 characters); "
                "the file holds the token's hash, never the token."
            )
        if any(e.name == name for e in entries):
            raise ConfigError(f"{where}: the name {name!r} is given twice.")
        entries.append(TokenEntry(name, role, bytes.fromhex(digest)))
    return tuple(entries)


def read_tokens(path: Path) -> tuple[TokenEntry, ...]:
    """The entries of the tokens file ``path``.

    Raises:
        ConfigError: the file cannot be read or holds a bad line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the tokens file {path} ({exc}); check --tokens.") from exc
    entries = parse_tokens(text, source=str(path))
    if not entries:
        raise ConfigError(f"the tokens file {path} holds no token; add NAME ROLE SHA256 lines.")
    return entries


def session_key(data_dir: Path) -> bytes:
    """The server's key for session cookies, made once in ``DATA/session.key`` (mode 0600)."""
    path = Path(data_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as out:
        key = secrets.token_bytes(32)
        out.write(key)
    return key


class TokenTable:
    """Every token the service accepts.

    Args:
        entries: the tokens file's entries plus the admin token's.
        key: the session cookies' key (:func:`session_key`).
    """

    def __init__(self, entries: tuple[TokenEntry, ...], key: bytes) -> None:
        self.entries = entries
        self._key = key

    @classmethod
    def build(cls, token: str, entries: tuple[TokenEntry, ...], key: bytes) -> TokenTable:
        """The table of ``--tokens`` entries and the single ``--token`` (an admin)."""
        admin = (TokenEntry(ADMIN, ADMIN, token_digest(token)),) if token else ()
        if admin and any(e.name == ADMIN for e in entries):
            raise ConfigError(
                "the tokens file names a token 'admin', the name of --token; rename it."
            )
        return cls(admin + tuple(entries), key)

    @property
    def open(self) -> bool:
        """No token is set: every request is an admin (loopback only)."""
        return not self.entries

    def identify(self, token: str) -> Principal | None:
        """Whose token this is (None: nobody's); every entry is compared, in constant time."""
        digest = token_digest(token)
        found: TokenEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return None if found is None else Principal(found.name, found.role)

    def _mac(self, entry: TokenEntry) -> str:
        message = f"{entry.name}\0{entry.role}\0".encode() + entry.digest
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def session(self, principal: Principal) -> str:
        """The session cookie's value for ``principal`` (its name and a MAC)."""
        (entry,) = (e for e in self.entries if e.name == principal.name)
        return f"{entry.name}:{self._mac(entry)}"

    def from_session(self, cookie: str) -> Principal | None:
        """Who a session cookie names (None: a forged, stale or malformed cookie)."""
        name, _, mac = cookie.partition(":")
        for entry in self.entries:
            if entry.name == name and hmac.compare_digest(mac.encode(), self._mac(entry).encode()):
                return Principal(entry.name, entry.role)
        return None

    def principal(self, request: Request) -> Principal | None:
        """Who sent ``request``: its bearer token, else its session cookie."""
        if self.open:
            return Principal("anonymous", ADMIN)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given.strip():
            return self.identify(given.strip())
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return self.from_session(cookie) if cookie else None


class RoleCheck:
    """A route's dependency: the request's principal must have ``role`` (403 otherwise).

    The guard middleware has already answered 401 to a request without a valid token;
    this check is what makes a route an operator's or an admin's.
    """

    def __init__(self, role: str) -> None:
        if role != PUBLIC and role not in ROLES:
            raise ValueError(f"not a role: {role!r}")
        self.role = role

    def __call__(self, request: Request) -> Principal | None:
        who: Principal | None = getattr(request.state, "principal", None)
        if self.role == PUBLIC:
            return who
        if who is None:  # the middleware lets no such request through; never trust that
            raise HTTPException(401, "missing or wrong token.", {"WWW-Authenticate": "Bearer"})
        if not who.may(self.role):
            raise HTTPException(
                403,
                f"{who.name} is a {who.role}; this needs the {self.role} role (ask an admin "
                "for a token with it).",
            )
        return who


def require(role: str) -> RoleCheck:
    """The dependency that lets only ``role`` (or a role above it) use a route."""
    return RoleCheck(role)
