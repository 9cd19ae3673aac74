"""Roles: every route of the app needs a declared role, and each role is let in or
refused exactly as that role says (401 without a token, 403 with too small a role)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.routing import APIRoute  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from starlette.routing import Mount, Route  # noqa: E402

from ctscreen.errors import ConfigError  # noqa: E402
from ctscreen.service.app import ServiceSettings, create_app  # noqa: E402
from ctscreen.service.roles import (  # noqa: E402
    ADMIN,
    OPERATOR,
    PUBLIC,
    ROLES,
    VIEWER,
    RoleCheck,
    parse_tokens,
)
from ctscreen.service.worker import WorkerConfig  # noqa: E402

#: The role each route needs. A route added to the app without a row here fails the test.
ROUTE_ROLES: dict[tuple[str, str], str] = {
    ("POST", "/api/v1/jobs"): OPERATOR,
    ("GET", "/api/v1/jobs"): VIEWER,
    ("GET", "/api/v1/jobs/{job_id}"): VIEWER,
    ("GET", "/api/v1/jobs/{job_id}/result.{fmt}"): VIEWER,
    ("GET", "/api/v1/results.{fmt}"): VIEWER,
    ("GET", "/api/v1/jobs/{job_id}/report"): VIEWER,
    ("DELETE", "/api/v1/jobs/{job_id}"): ADMIN,
    ("GET", "/api/v1/dicom"): VIEWER,
    ("POST", "/api/v1/dicom/outbox/retry"): OPERATOR,
    ("GET", "/ui/dicom"): VIEWER,
    ("GET", "/api/v1/audit"): ADMIN,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): VIEWER,
    ("GET", "/docs"): VIEWER,
    ("GET", "/"): PUBLIC,
    ("GET", "/ui/jobs"): VIEWER,
    ("POST", "/ui/login"): PUBLIC,
    ("GET", "/openapi.json"): VIEWER,  # FastAPI's own: any valid token (the guard)
}
TOKENS = {role: f"{role}-token-for-tests" for role in ROLES}
ADMIN_TOKEN = "the-single-admin-token"


def _line(name: str, role: str, token: str) -> str:
    return f"{name} {role} {hashlib.sha256(token.encode()).hexdigest()}"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    text = "# name role sha256\n" + "\n".join(
        _line(f"{role}-user", role, token) for role, token in TOKENS.items()
    )
    settings = ServiceSettings(
        data_dir=tmp_path_factory.mktemp("roles"),
        worker=WorkerConfig(weights="unused.pth"),
        token=ADMIN_TOKEN,
        tokens=parse_tokens(text),
    )
    app = create_app(settings)
    yield TestClient(app)  # no lifespan: the worker never starts
    app.state.store.close()


def _declared_role(route: APIRoute) -> str | None:
    checks = [d.call for d in route.dependant.dependencies if isinstance(d.call, RoleCheck)]
    return checks[0].role if len(checks) == 1 else None


def _flat(routes: list, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every route with its path prefix, inside included routers too."""
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI >= 0.165 includes routers lazily
            yield from _flat(route.original_router.routes, prefix + route.include_context.prefix)
        else:
            yield prefix, route


def _routes(client: TestClient) -> dict[tuple[str, str], str | None]:
    found: dict[tuple[str, str], str | None] = {}
    for prefix, route in _flat(client.app.routes):
        if isinstance(route, APIRoute):
            for method in route.methods:
                found[(method, prefix + route.path)] = _declared_role(route)
        elif isinstance(route, Route):
            found[("GET", prefix + route.path)] = VIEWER  # the guard's token check only
        else:
            assert isinstance(route, Mount) and route.path == "/static", route
    return found


def test_every_route_declares_the_role_of_the_table(client: TestClient) -> None:
    assert _routes(client) == ROUTE_ROLES


@pytest.mark.parametrize(("method", "path"), sorted(ROUTE_ROLES))
def test_each_role_is_let_in_or_refused_as_the_table_says(
    client: TestClient, method: str, path: str
) -> None:
    needed = ROUTE_ROLES[(method, path)]
    url = path.format(job_id="A" * 22, fmt="csv")
    callers = {None: None, **TOKENS, "single --token": ADMIN_TOKEN}
    for caller, token in callers.items():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        status = client.request(method, url, headers=headers).status_code
        role = ADMIN if caller == "single --token" else caller
        if needed == PUBLIC:
            assert status != 403, (caller, status)
        elif role is None:
            assert status == 401, (caller, status)
        elif ROLES.index(role) < ROLES.index(needed):
            assert status == 403, (caller, status)
        else:
            assert status not in (401, 403), (caller, status)


def test_a_refusal_says_which_role_is_needed_and_a_wrong_token_gets_401(
    client: TestClient,
) -> None:
    refused = client.delete(
        f"/api/v1/jobs/{'A' * 22}", headers={"Authorization": f"Bearer {TOKENS[OPERATOR]}"}
    )
    assert refused.status_code == 403
    assert refused.json()["detail"].startswith("operator-user is a operator; this needs the admin")
    wrong = client.get("/api/v1/jobs", headers={"Authorization": "Bearer viewer-token"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/static/app.js").status_code == 200  # static files need no token
    operator_page = client.get("/", headers={"Authorization": f"Bearer {TOKENS[OPERATOR]}"})
    assert 'id="upload"' in operator_page.text


def test_a_viewer_signs_in_on_the_page_and_stays_a_viewer(client: TestClient) -> None:
    answer = client.post("/ui/login", data={"token": TOKENS[VIEWER]}, follow_redirects=False)
    assert answer.status_code == 303
    cookie = answer.cookies["ctscreen_session"]
    assert cookie.startswith("viewer-user:") and TOKENS[VIEWER] not in cookie
    client.cookies.set("ctscreen_session", cookie)
    try:
        page = client.get("/?lang=en")
        assert page.status_code == 200 and 'id="upload"' not in page.text
        assert "signed in as a viewer" in page.text  # results, no upload form
        assert client.get("/ui/jobs").status_code == 200
        assert client.delete(f"/api/v1/jobs/{'A' * 22}").status_code == 403
        client.cookies.set("ctscreen_session", "admin:" + "0" * 64)  # forged
        assert client.get("/api/v1/jobs").status_code == 401
    finally:
        client.cookies.clear()


def test_a_tokens_file_holds_hashes_never_tokens(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never the token"):
        parse_tokens("alice viewer my-secret-token")
    with pytest.raises(ConfigError, match="role 'root'"):
        parse_tokens(_line("bob", "root", "x"))
    with pytest.raises(ConfigError, match="given twice"):
        parse_tokens(_line("bob", "viewer", "x") + "\n" + _line("bob", "admin", "y"))
    with pytest.raises(ConfigError, match="NAME ROLE SHA256"):
        parse_tokens("bob viewer")
    (entry,) = parse_tokens("  carol  OPERATOR  sha256:" + "AB" * 32 + "  # on call")
    assert (entry.name, entry.role, entry.digest) == ("carol", OPERATOR, bytes.fromhex("ab" * 32))
