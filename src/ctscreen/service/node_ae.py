"""The DICOM node's application entity: what it accepts, and its TLS.

Verification and every storage SOP class are accepted at association time (CT with
every transfer syntax pynetdicom knows, so that a PACS may send JPEG, JPEG 2000 or
RLE); which instances are kept is decided per C-STORE (:mod:`.dicom_node`).
With ``--dicom-tls-cert/--dicom-tls-key`` the port speaks TLS only (a plain
association fails its handshake and is never established); with ``--dicom-tls-ca``
a caller must also present a certificate that CA signed.
"""

from __future__ import annotations

import logging
import ssl

from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from ..dicom.instance import CT_SOP_CLASSES
from ..errors import ConfigError
from .node_settings import NodeSettings

log = logging.getLogger(__name__)

#: The SOP classes the node scores; every other storage class is refused per instance.
ACCEPTED_SOP_CLASSES: frozenset[str] = CT_SOP_CLASSES
#: Every transfer syntax pynetdicom knows, for CT (a PACS may send JPEG, JPEG 2000, RLE...).
_CT_TRANSFER_SYNTAXES: list[str] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def node_ae(settings: NodeSettings) -> AE:
    """The node's AE: Verification and storage, the called (and allowed calling) AE titles."""
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        syntaxes = (
            _CT_TRANSFER_SYNTAXES
            if context.abstract_syntax in ACCEPTED_SOP_CLASSES
            else context.transfer_syntax
        )
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.maximum_associations = 16
    ae.require_called_aet = True  # a PACS calling another AE title is misconfigured
    if settings.allowed_aes:
        ae.require_calling_aet = list(settings.allowed_aes)
    elif settings.host not in LOOPBACK:
        log.warning(
            "the DICOM port accepts studies from any AE on the network; restrict it with "
            "--allow-ae (the PACS's AE title) or a firewall"
        )
    return ae


def server_tls(settings: NodeSettings) -> ssl.SSLContext | None:
    """The TLS context of the DICOM port (None: plain DICOM).

    Raises:
        ConfigError: a certificate, key or CA file that cannot be loaded.
    """
    if not settings.tls_cert:
        if settings.host not in LOOPBACK:
            log.warning("the DICOM port is not encrypted; see --dicom-tls-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_ca:
            context.load_verify_locations(cafile=settings.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the DICOM TLS files ({exc}); check --dicom-tls-cert, "
            "--dicom-tls-key and --dicom-tls-ca (PEM files)."
        ) from exc
    return context


def client_tls(settings: NodeSettings) -> ssl.SSLContext | None:
    """The TLS context the outbox sends with (None: plain DICOM, without ``send_tls``).

    Raises:
        ConfigError: a certificate, key or CA file that cannot be loaded.
    """
    if not settings.send_tls:
        return None
    try:
        context = ssl.create_default_context(cafile=settings.tls_ca or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.tls_cert:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the DICOM TLS files for sending ({exc}); check --dicom-tls-cert, "
            "--dicom-tls-key and --dicom-tls-ca (PEM files)."
        ) from exc
    return context
