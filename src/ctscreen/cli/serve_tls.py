"""``ctscreen serve``'s TLS options: certificates and keys come in pairs, and exist."""

from __future__ import annotations

import argparse


def check_tls_files(args: argparse.Namespace) -> None:
    """Certificates and keys come in pairs, and exist.

    Raises:
        ConfigError: one of a pair without the other, or a file that is not there.
    """
    from ..errors import ConfigError

    pairs = (("--tls-cert", "--tls-key"), ("--dicom-tls-cert", "--dicom-tls-key"))
    for cert, key in pairs:
        given = [getattr(args, o[2:].replace("-", "_"), None) for o in (cert, key)]
        if (given[0] is None) != (given[1] is None):
            raise ConfigError(f"{cert} and {key} go together; give both or neither.")
    if args.dicom_tls_ca is not None and args.dicom_tls_cert is None:
        raise ConfigError("--dicom-tls-ca needs --dicom-tls-cert and --dicom-tls-key.")
    for option in ("tls_cert", "tls_key", "dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca"):
        path = getattr(args, option, None)
        if path is not None and not path.is_file():
            name = "--" + option.replace("_", "-")
            raise ConfigError(f"{name} {path} is not a file; give the PEM file's path.")
