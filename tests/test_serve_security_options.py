"""``ctscreen serve``'s security options: retention durations, the tokens file and the TLS
files, from the command line and from CTSCREEN_* variables (as the container sets them)."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from ctscreen.cli import build_parser  # noqa: E402
from ctscreen.cli.serve import apply_environment, check_tls_files, settings_from_args  # noqa: E402
from ctscreen.cli.types import duration  # noqa: E402
from ctscreen.errors import ConfigError  # noqa: E402
from ctscreen.service.roles import OPERATOR  # noqa: E402


def _args(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str, **env: str):
    for name in list(os.environ):
        if name.startswith("CTSCREEN_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"not read here")
    argv = ("serve", "-w", str(weights), "--data", str(tmp_path / "data"), *argv)
    return apply_environment(build_parser().parse_args(list(argv)))


def test_durations_read_as_seconds_and_never_as_infinity() -> None:
    assert [duration(t) for t in ("0", "45", "90s", "15m", "12h", "30d", "never")] == [
        0.0,
        45.0,
        90.0,
        900.0,
        43200.0,
        2592000.0,
        math.inf,
    ]
    for bad in ("soon", "-1d", "3w"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration(bad)


def test_retention_defaults_flags_and_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    default = settings_from_args(_args(monkeypatch, tmp_path)).retention
    assert (default.keep_uploads, default.keep_results) == (0.0, 30 * 86400.0)
    from_env = _args(
        monkeypatch, tmp_path, CTSCREEN_KEEP_UPLOADS="2h", CTSCREEN_KEEP_RESULTS="never"
    )
    assert (from_env.keep_uploads, from_env.keep_results) == (7200.0, math.inf)
    flag = _args(monkeypatch, tmp_path, "--keep-results", "7d", CTSCREEN_KEEP_RESULTS="1d")
    assert flag.keep_results == 7 * 86400.0  # the flag wins
    with pytest.raises(ConfigError, match="CTSCREEN_KEEP_UPLOADS='soon' is not accepted"):
        _args(monkeypatch, tmp_path, CTSCREEN_KEEP_UPLOADS="soon")


def test_a_tokens_file_is_enough_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"pacs-op operator {hashlib.sha256(b't').hexdigest()}\n")
    args = _args(monkeypatch, tmp_path, "--host", "0.0.0.0", CTSCREEN_TOKENS=str(tokens))
    settings = settings_from_args(args)
    assert settings.token == "" and [(e.name, e.role) for e in settings.tokens] == [
        ("pacs-op", OPERATOR)
    ]
    tokens.write_text("pacs-op operator t\n")
    with pytest.raises(ConfigError, match="line 1.*never the token"):
        settings_from_args(args)
    with pytest.raises(ConfigError, match="CTSCREEN_TOKEN"):
        settings_from_args(_args(monkeypatch, tmp_path, "--host", "0.0.0.0"))


def test_tls_files_come_in_pairs_and_must_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pem = tmp_path / "server.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        check_tls_files(_args(monkeypatch, tmp_path, "--tls-cert", str(pem)))
    with pytest.raises(ConfigError, match="--dicom-tls-key .* is not a file"):
        check_tls_files(
            _args(
                monkeypatch,
                tmp_path,
                CTSCREEN_DICOM_TLS_CERT=str(pem),
                CTSCREEN_DICOM_TLS_KEY=str(tmp_path / "absent.key"),
            )
        )
    with pytest.raises(ConfigError, match="--dicom-tls-ca needs"):
        check_tls_files(_args(monkeypatch, tmp_path, "--dicom-tls-ca", str(pem)))
    check_tls_files(_args(monkeypatch, tmp_path, "--tls-cert", str(pem), "--tls-key", str(pem)))
