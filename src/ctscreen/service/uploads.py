"""Uploads to ``POST /api/v1/jobs``: a multipart body streamed to disk, file by file.

Each file is written under a generated name (:func:`~ctscreen.service.store.stored_name`)
as it arrives, with the server's size and count limits checked on the way; the
client's file name is kept only as display text (:func:`display_name`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from python_multipart.multipart import MultipartParser, parse_options_header

from .store import InputFile, JobStore, stored_name

log = logging.getLogger(__name__)

UPLOAD_MODES: tuple[str, ...] = ("study", "slice")
_MAX_NAME = 200


def display_name(filename: str | None, index: int) -> str:
    """A client's file name made safe to show: its last path part, printable, bounded.

    It is display text only; the file is stored under a generated name.
    """
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    return name[:_MAX_NAME] or f"upload-{index + 1}"


class UploadRejected(Exception):
    """An upload breaks a limit or is malformed; carries the HTTP status and a sentence."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class UploadWriter:
    """Receives a multipart body chunk by chunk and writes each file straight to disk."""

    def __init__(self, folder: Path, *, max_bytes: int, max_files: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.inputs: list[InputFile] = []
        self.fields: dict[str, str] = {}
        self.total = 0
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._file: Any = None
        self._name = ""
        self._size = 0
        self._hash = hashlib.sha256()
        self._text: bytearray | None = None
        self._field_name = ""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if field_name == "files" and filename is not None:
            if len(self.inputs) >= self.max_files:
                raise UploadRejected(
                    413, f"too many files in one upload (at most {self.max_files}); split it."
                )
            index = len(self.inputs)
            self._name = display_name(filename.decode("utf-8", "replace"), index)
            self._file = open(self.folder / stored_name(index), "wb")  # noqa: SIM115
            self._size = 0
            self._hash = hashlib.sha256()
            self._text = None
        elif field_name in ("mode",):
            self._text = bytearray()
            self._field_name = field_name
        else:
            raise UploadRejected(
                400,
                f"unexpected form field {field_name!r}: send the files as 'files' "
                "(and optionally 'mode').",
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        self.total += n
        if self.total > self.max_bytes:
            raise UploadRejected(
                413,
                f"the upload is larger than {self.max_bytes / 1024**2:.0f} MiB, the limit of "
                "this server; send fewer files per job.",
            )
        if self._file is not None:
            self._file.write(data[start:end])
            self._hash.update(data[start:end])
            self._size += n
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > 100:
                raise UploadRejected(400, "form field 'mode' is too long.")

    def _part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            index = len(self.inputs)
            self.inputs.append(
                InputFile(index, self._name, stored_name(index), self._size, self._hash.hexdigest())
            )
            self._file = None
        elif self._text is not None:
            self.fields[self._field_name] = self._text.decode("utf-8", "replace").strip()
            self._text = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class Upload:
    """What one upload brought: its files (stored) and its mode."""

    inputs: list[InputFile]
    mode: str


async def receive_upload(
    request: Request, store: JobStore, job_id: str, *, max_bytes: int, max_files: int
) -> Upload:
    """Stream the multipart body of ``request`` into ``job_id``'s upload folder.

    Raises:
        HTTPException: 413 (too large, too many files), 415 (not multipart), 400 (a
            malformed or torn body), 422 (no files, a bad mode), 507 (the disk is full);
            the folder is removed first.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise HTTPException(
            413,
            f"the upload is larger than {max_bytes / 1024**2:.0f} MiB, the "
            "limit of this server; send fewer files per job.",
        )
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise HTTPException(415, "send the studies as multipart/form-data with the field 'files'.")
    writer = UploadWriter(store.upload_dir(job_id), max_bytes=max_bytes, max_files=max_files)
    parser = MultipartParser(boundary, writer.callbacks())
    try:
        async for chunk in request.stream():
            # File writes block; off the event loop, the other requests keep flowing.
            await asyncio.to_thread(parser.write, chunk)
        parser.finalize()
    except UploadRejected as exc:
        writer.close()
        store.discard_upload(job_id)
        raise HTTPException(exc.status, exc.detail) from None
    except OSError as exc:  # the disk is full or the data folder went away
        writer.close()
        store.discard_upload(job_id)
        log.error("upload %s could not be stored: %s", job_id, exc)
        raise HTTPException(
            507, f"the server could not store the upload ({exc.strerror or exc}); try later."
        ) from None
    except Exception as exc:  # a torn connection or a malformed body
        writer.close()
        store.discard_upload(job_id)
        log.info("upload %s abandoned: %s", job_id, exc)
        raise HTTPException(400, f"the upload could not be read ({exc}).") from None
    mode = writer.fields.get("mode", "study") or "study"
    if mode not in UPLOAD_MODES:
        store.discard_upload(job_id)
        raise HTTPException(422, f"mode must be one of {', '.join(UPLOAD_MODES)}.")
    if not writer.inputs:
        store.discard_upload(job_id)
        raise HTTPException(422, "no files in the upload: send them in the field 'files'.")
    return Upload(writer.inputs, mode)
