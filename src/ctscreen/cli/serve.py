"""``ctscreen serve``: the screening service (web page, REST API, persistent job store)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import EXIT_OK
from .serve_tls import check_tls_files
from .types import add_runtime_arguments, duration, positive_float, positive_int, probability

log = logging.getLogger(__name__)

TOKEN_ENV = "CTSCREEN_TOKEN"

#: Options a container sets by environment: (attribute, variable, parse, default). A flag
#: given on the command line wins; an empty variable counts as unset.
ENVIRONMENT: tuple[tuple[str, str, Callable[[str], Any], Any], ...] = (
    ("weights", "CTSCREEN_WEIGHTS", Path, None),
    ("data", "CTSCREEN_DATA", Path, Path("ctscreen-data")),
    ("host", "CTSCREEN_HOST", str, "127.0.0.1"),
    ("port", "CTSCREEN_PORT", positive_int, 8000),
    ("dicom_port", "CTSCREEN_DICOM_PORT", positive_int, None),
    ("ae_title", "CTSCREEN_AE_TITLE", str, "CTSCREEN"),
    ("send_to", "CTSCREEN_SEND_TO", lambda text: [d for d in re.split(r"[,\s]+", text) if d], []),
    ("tokens", "CTSCREEN_TOKENS", Path, None),
    ("tls_cert", "CTSCREEN_TLS_CERT", Path, None),
    ("tls_key", "CTSCREEN_TLS_KEY", Path, None),
    ("dicom_tls_cert", "CTSCREEN_DICOM_TLS_CERT", Path, None),
    ("dicom_tls_key", "CTSCREEN_DICOM_TLS_KEY", Path, None),
    ("dicom_tls_ca", "CTSCREEN_DICOM_TLS_CA", Path, None),
    ("send_tls", "CTSCREEN_SEND_TLS", lambda text: text.lower() in ("1", "true", "yes"), False),
    ("keep_uploads", "CTSCREEN_KEEP_UPLOADS", duration, 0.0),
    ("keep_results", "CTSCREEN_KEEP_RESULTS", duration, 30 * 86400.0),
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the screening service: web page, REST API, persistent job store",
        description=(
            "Serve a web page and a versioned REST API (/docs) that take zip archives or DICOM "
            "files and return the result table. Jobs, uploads and results persist in --data; "
            "scoring runs in a child process with a hard time limit per study. Needs the "
            "'serve' extra: pip install 'ctscreen[serve]'."
        ),
    )
    p.add_argument(
        "--weights",
        "-w",
        type=Path,
        help="checkpoint file (.pth) or bundle folder from `ctscreen export` "
        "(default: $CTSCREEN_WEIGHTS)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="folder of the job store, uploads and results ($CTSCREEN_DATA, else ./ctscreen-data)",
    )
    p.add_argument("--host", help="address to listen on ($CTSCREEN_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=positive_int, help="port ($CTSCREEN_PORT, else 8000)")
    p.add_argument(
        "--token",
        default=None,
        help=f"the admin token (default: ${TOKEN_ENV}); a token or --tokens is required when "
        "--host is not loopback",
    )
    p.add_argument(
        "--tokens",
        type=Path,
        metavar="FILE",
        help="tokens with roles, one line each: NAME ROLE SHA256 (role viewer, operator or "
        "admin; the token's hex SHA-256, never the token) ($CTSCREEN_TOKENS)",
    )
    p.add_argument(
        "--study-timeout",
        type=positive_float,
        default=600.0,
        help="seconds one study may take before its job is stopped and recorded (600)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=positive_int,
        default=4096,
        help="largest upload (one job) in MiB (4096)",
    )
    p.add_argument(
        "--max-files", type=positive_int, default=100, help="most files in one upload (100)"
    )
    p.add_argument(
        "--max-jobs",
        type=positive_int,
        default=50,
        help="most jobs queued or running at once; more get 429 (50)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="serve HTTPS with this certificate (chain) file; needs --tls-key ($CTSCREEN_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key", type=Path, metavar="PEM", help="its private key ($CTSCREEN_TLS_KEY)"
    )
    p.add_argument(
        "--keep-uploads",
        type=duration,
        metavar="DURATION",
        help="how long uploaded studies (and studies the DICOM node received) are kept after "
        "their job ended, e.g. 0, 12h, 7d ($CTSCREEN_KEEP_UPLOADS, else 0: removed as soon "
        "as scored and, for the node, answered)",
    )
    p.add_argument(
        "--keep-results",
        type=duration,
        metavar="DURATION",
        help="how long results (rows, tables, reports, SR and key images) are kept after their "
        "job ended; the job is then marked expired ($CTSCREEN_KEEP_RESULTS, else 30d; "
        "'never' keeps them until deleted)",
    )
    p.add_argument(
        "--threshold", type=probability, help="decision threshold (default: the model card's)"
    )
    add_runtime_arguments(p)
    p.add_argument("--batch-size", type=positive_int, help="as predict")
    p.add_argument("--readers", type=positive_int, help="as predict")
    p.add_argument("--min-slices", type=positive_int, default=16, help="reject thinner series")
    p.add_argument(
        "--no-localization", action="store_true", help="leave pathology_localization empty"
    )
    p.add_argument(
        "--no-report-pictures",
        action="store_true",
        help="job reports without the score curve and key-slice pictures (saves their drawing "
        "time per study)",
    )
    dicom = p.add_argument_group(
        "DICOM node", "receive studies by C-STORE and send SR + key images back (extra 'dicom')"
    )
    dicom.add_argument(
        "--dicom-port",
        type=positive_int,
        help="listen for DICOM (C-ECHO, CT C-STORE) on this port ($CTSCREEN_DICOM_PORT; "
        "without either the node is off)",
    )
    dicom.add_argument("--ae-title", help="the node's AE title ($CTSCREEN_AE_TITLE, else CTSCREEN)")
    dicom.add_argument("--dicom-host", help="address the DICOM port listens on (default: --host)")
    dicom.add_argument(
        "--send-to",
        action="append",
        default=None,
        metavar="AET@HOST:PORT",
        help="send the answer (SR and key images, or a 'not screened' SR) of every received "
        "study to this AE instead of back to the calling AE (repeat for several; "
        "$CTSCREEN_SEND_TO, several separated by commas)",
    )
    dicom.add_argument(
        "--allow-ae",
        action="append",
        default=[],
        metavar="AET[@HOST:PORT]",
        help="accept associations only from this calling AE title (repeat for several; "
        "default: any); with @HOST:PORT, answers to the studies it sends go back there",
    )
    dicom.add_argument(
        "--dicom-tls-cert",
        type=Path,
        metavar="PEM",
        help="the DICOM port speaks TLS only, with this certificate; plain associations are "
        "refused; needs --dicom-tls-key ($CTSCREEN_DICOM_TLS_CERT)",
    )
    dicom.add_argument(
        "--dicom-tls-key", type=Path, metavar="PEM", help="its key ($CTSCREEN_DICOM_TLS_KEY)"
    )
    dicom.add_argument(
        "--dicom-tls-ca",
        type=Path,
        metavar="PEM",
        help="callers must present a certificate this CA signed (mutual TLS) "
        "($CTSCREEN_DICOM_TLS_CA)",
    )
    dicom.add_argument(
        "--send-tls",
        action="store_true",
        default=None,
        help="send the answers over TLS too, checking the destination's certificate against "
        "--dicom-tls-ca (else the system's CAs), with --dicom-tls-cert as the client's "
        "($CTSCREEN_SEND_TLS=1)",
    )
    dicom.add_argument(
        "--stable-seconds",
        type=positive_float,
        default=10.0,
        help="a study is complete after this many seconds without a new instance (10)",
    )
    dicom.add_argument(
        "--send-retry-seconds",
        type=positive_float,
        default=10.0,
        help="first wait before sending again to a destination that failed; doubles up to "
        "--send-retry-max (10)",
    )
    dicom.add_argument(
        "--send-retry-max",
        type=positive_float,
        default=300.0,
        help="longest wait between two tries (300)",
    )
    p.set_defaults(func=run)


def apply_environment(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options not given on the command line from :data:`ENVIRONMENT`, then
    their defaults (in place; returns ``args``).

    Raises:
        ConfigError: a variable whose value the option does not accept.
    """
    from ..errors import ConfigError

    for attribute, variable, parse, default in ENVIRONMENT:
        if getattr(args, attribute, None) is not None:
            continue
        text = os.environ.get(variable, "").strip()
        if not text:
            setattr(args, attribute, default)
            continue
        try:
            setattr(args, attribute, parse(text))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(
                f"{variable}={text!r} is not accepted ({exc}); fix or unset it."
            ) from exc
    return args


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_before_loading(args: argparse.Namespace) -> None:
    """What can be checked before the model loads, so that a container with a missing
    weight file, extra or bad setting stops at once with one sentence.

    Raises:
        WeightsError: no weights given, or the path is neither a checkpoint file nor a
            valid bundle.
        ConfigError: a .pth without PyTorch installed, the DICOM node without the
            'dicom' extra, --send-to without the node, or a bad destination.
    """
    from ..bundle import is_bundle, load_bundle
    from ..errors import ConfigError, WeightsError, needs_torch

    check_tls_files(args)
    if args.weights is None:
        raise WeightsError("no weights given: pass --weights PATH or set CTSCREEN_WEIGHTS.")
    if is_bundle(args.weights):
        load_bundle(args.weights)  # its card and graph hashes
    elif not args.weights.is_file():
        raise WeightsError(
            f"weight file {args.weights} not found; pass --weights PATH (a .pth checkpoint or "
            "a bundle folder from `ctscreen export`)."
        )
    elif not _importable("torch"):
        raise needs_torch(f"serving the checkpoint {args.weights}")
    if args.dicom_port is None:
        if args.send_to:
            raise ConfigError("--send-to needs --dicom-port (the DICOM node is off without it).")
        return
    missing = [name for name in ("pynetdicom", "highdicom") if not _importable(name)]
    if missing:
        raise ConfigError(
            f"the DICOM node needs the 'dicom' extra ({missing[0]} is missing): "
            "pip install 'ctscreen[dicom]', or leave out --dicom-port (CTSCREEN_DICOM_PORT)."
        )
    if args.send_to:
        from ..service.sender import parse_destination

        for destination in args.send_to:
            parse_destination(destination)


def node_from_args(
    args: argparse.Namespace, data_dir: Path, wake: Any, run_info: Any = dict, answered: Any = None
) -> Any:
    """The DICOM node the arguments ask for, or None without ``--dicom-port``.

    Raises:
        ConfigError: a bad AE title or destination, or the 'dicom' extra is missing.
    """
    from ..errors import ConfigError

    if args.dicom_port is None:
        if args.send_to:
            raise ConfigError("--send-to needs --dicom-port (the DICOM node is off without it).")
        return None
    try:
        from ..service.dicom_node import DicomNode, NodeSettings
        from ..service.sender import parse_destination
    except ImportError as exc:
        raise ConfigError(
            f"the DICOM node needs the 'dicom' extra ({exc.name} is missing): "
            "pip install 'ctscreen[dicom]'."
        ) from exc
    peers = tuple(parse_destination(a, option="--allow-ae") for a in args.allow_ae if "@" in a)
    settings = NodeSettings(
        port=args.dicom_port,
        ae_title=args.ae_title,
        host=args.dicom_host or args.host,
        send_to=tuple(parse_destination(d) for d in args.send_to),
        stable_seconds=args.stable_seconds,
        retry_base=args.send_retry_seconds,
        retry_max=max(args.send_retry_max, args.send_retry_seconds),
        allowed_aes=tuple(a.split("@", 1)[0].strip() for a in args.allow_ae),
        peers=peers,
        tls_cert=str(args.dicom_tls_cert or ""),
        tls_key=str(args.dicom_tls_key or ""),
        tls_ca=str(args.dicom_tls_ca or ""),
        send_tls=bool(args.send_tls),
    )
    answered = answered or (lambda job_id: None)
    return DicomNode(data_dir, settings, wake=wake, run_info=run_info, answered=answered)


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`ServiceSettings` the arguments ask for (checks the listen address).

    Raises:
        ConfigError: a non-loopback host without a token, or the extra is missing.
        WeightsError: the weight file does not exist.
    """
    from ..errors import ConfigError, WeightsError

    try:
        from ..service.app import ServiceSettings, check_listen_address
        from ..service.retention import RetentionPolicy
        from ..service.roles import read_tokens
        from ..service.worker import WorkerConfig
    except ImportError as exc:
        raise ConfigError(
            f"ctscreen serve needs the 'serve' extra ({exc.name} is missing): "
            "pip install 'ctscreen[serve]'."
        ) from exc
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    tokens = read_tokens(args.tokens) if args.tokens is not None else ()
    check_listen_address(args.host, token, tokens_file=bool(tokens))
    if not (args.weights.is_file() or args.weights.is_dir()):
        raise WeightsError(f"weight file {args.weights} not found; pass --weights PATH.")
    worker = WorkerConfig(
        weights=str(args.weights.resolve()),
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        threshold=args.threshold,
        min_slices=args.min_slices,
        localize=not args.no_localization,
        batch_size=args.batch_size,
        readers=args.readers,
        report_pictures=not args.no_report_pictures,
        log_level=args.log_level,
    )
    return ServiceSettings(
        data_dir=args.data,
        worker=worker,
        token=token,
        tokens=tokens,
        study_timeout=args.study_timeout,
        max_upload_bytes=args.max_upload_mb * 1024**2,
        max_files=args.max_files,
        max_active_jobs=args.max_jobs,
        retention=RetentionPolicy(keep_uploads=args.keep_uploads, keep_results=args.keep_results),
    )


def run(args: argparse.Namespace) -> int:
    apply_environment(args)
    check_before_loading(args)
    settings = settings_from_args(args)  # the 'serve' extra is checked here
    import uvicorn

    from ..service.app import create_app
    from .console import echo

    app = create_app(settings)
    worker = app.state.worker
    worker.start()
    node = None
    try:
        # A weight file that cannot load stops here, with its sentence and exit code 2,
        # instead of a server that answers but never scores.
        worker.wait_ready(settings.load_timeout)
        node = node_from_args(  # hook: the DICOM node
            args,
            settings.data_dir,
            worker.wake,
            run_info=lambda: worker.run_info,
            answered=app.state.retention.job_ended,
        )
        if node is not None:
            node.start()
            app.state.node = node  # its outbox in /api/v1/dicom and /metrics
    except BaseException:
        worker.stop()
        raise
    # A line for the person who started it, not a warning: printed at every log level.
    scheme = "https" if args.tls_cert else "http"
    echo(
        f"ctscreen serve on {scheme}://{args.host}:{args.port} (data in {settings.data_dir}, "
        f"token {'required' if settings.token or settings.tokens else 'off: loopback only'})"
    )
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level.lower(),
            ssl_certfile=args.tls_cert,
            ssl_keyfile=args.tls_key,
        )
    finally:
        if node is not None:
            node.stop()
    return EXIT_OK
