"""How the DICOM node runs: its AE, where answers go, its timers."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .sender import Destination, Route


@dataclass(frozen=True)
class NodeSettings:
    """How the DICOM node runs.

    Attributes:
        port: the DICOM port to listen on.
        ae_title: the node's AE title (also the calling AE title when sending).
        host: the address to listen on.
        send_to: where every answer goes instead of back to the calling AE (several
            allowed).
        stable_seconds: a study is complete after this many seconds without a new instance.
        retry_base, retry_max: outbox backoff (seconds): first wait, longest wait.
        allowed_aes: calling AE titles accepted (empty: any); others are rejected at
            association time. The called AE title must always be ``ae_title``.
        peers: the addresses of calling AEs (``--allow-ae AET@HOST:PORT``): an
            answer goes back to the AE that sent the study when ``send_to`` is empty.
        tls_cert, tls_key: the node's certificate and key (PEM files); when set, the
            DICOM port speaks TLS only and refuses plain associations.
        tls_ca: the CA (PEM) whose certificates callers must present (mutual TLS);
            "" for none.
        send_tls: send the answers over TLS too (the destination's certificate checked
            against ``tls_ca``, else the system's CAs; ``tls_cert`` as the client's).
    """

    port: int
    ae_title: str = "CTSCREEN"
    host: str = "127.0.0.1"
    send_to: tuple[Destination, ...] = ()
    stable_seconds: float = 10.0
    retry_base: float = 10.0
    retry_max: float = 300.0
    allowed_aes: tuple[str, ...] = ()
    peers: tuple[Destination, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    send_tls: bool = False

    def route(self, calling_ae: str) -> Route:
        """Where the answer to a study sent by ``calling_ae`` goes."""
        if self.send_to:
            return Route([str(d) for d in self.send_to])
        for peer in self.peers:
            if peer.ae_title == calling_ae:
                return Route([str(peer)])
        return Route(
            [],
            f"no address for the calling AE {calling_ae or '(unknown)'}: start the node with "
            f"--allow-ae {calling_ae or 'AET'}@HOST:PORT (or --send-to AET@HOST:PORT)",
        )

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key) or (self.tls_ca and not self.tls_cert):
            raise ConfigError(
                "DICOM TLS needs --dicom-tls-cert and --dicom-tls-key together "
                "(and --dicom-tls-ca only with them)."
            )
        title = self.ae_title
        ok = bool(title.strip()) and len(title) <= 16
        if not ok or "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
            raise ConfigError(
                f"--ae-title {self.ae_title!r} is not an AE title (1-16 characters, no "
                "backslash or control characters)."
            )
