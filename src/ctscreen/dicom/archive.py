"""Safe extraction of zip archives into a run-owned work area.

A zip from outside is untrusted. Extraction here never writes outside the
target folder (members with ``..``, absolute paths, drive letters or links are
refused) and cannot exhaust memory or disk: the member count, the total
uncompressed size and the compression ratio are bounded, and the bounds are
enforced on the bytes actually written, not only on the sizes the archive
claims. Member names are decoded as UTF-8 when the archive says so (or when
they are valid UTF-8), otherwise as cp866, the code page Windows uses for
Cyrillic names in zips (``Датасет``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import InputError, UnsafeArchiveError

log = logging.getLogger(__name__)

_UTF8_FLAG = 0x800
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds that turn a hostile archive into an error for that input.

    Attributes:
        max_members: most entries an archive may hold.
        max_total_bytes: most bytes all members may expand to.
        max_ratio: largest uncompressed/compressed ratio of a member larger
            than ``ratio_min_bytes`` (CT slices compress 2-10x; bombs 1000x+).
        ratio_min_bytes: members smaller than this are not ratio-checked
            (tiny files of zeros compress extremely well and are harmless).
    """

    max_members: int = 200_000
    max_total_bytes: int = 32 * 1024**3
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1024 * 1024


def decode_member_name(info: zipfile.ZipInfo) -> str:
    """The member's name as the archive's author saw it.

    Python decodes names without the UTF-8 flag as cp437. Windows archivers
    with a Russian locale write cp866, and many Unix tools write UTF-8 without
    setting the flag, so such names are re-decoded: UTF-8 first (it rarely
    validates by accident), then cp866.
    """
    if info.flag_bits & _UTF8_FLAG:
        return info.filename
    raw = info.filename.encode("cp437")
    if raw.isascii():
        return info.filename
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp866")


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path a member may be written to, or None for a directory entry.

    Raises:
        UnsafeArchiveError: the name is absolute, has a drive letter or climbs
            out of the archive with ``..``.
    """
    normalised = name.replace("\\", "/")
    if normalised.endswith("/"):
        return None
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if normalised.startswith("/") or (parts and len(parts[0]) == 2 and parts[0][1] == ":"):
        raise UnsafeArchiveError(
            f"archive member {name!r} has an absolute path; the archive is refused "
            "because it would write outside its folder, so re-create it with relative paths."
        )
    if ".." in parts:
        raise UnsafeArchiveError(
            f"archive member {name!r} climbs out of the archive with '..'; the archive "
            "is refused (zip-slip), so re-create it without such paths."
        )
    if not parts:
        return None
    return PurePosixPath(*parts)


#: Longest file-name component, in bytes of the file system's encoding, that a
#: member keeps as it is (NAME_MAX is 255 on Linux, macOS and Windows).
MAX_NAME_BYTES = 255
#: Longest relative path, in bytes, a member keeps (PATH_MAX is 4096 on Linux; the
#: work area's own folder takes part of it).
MAX_PATH_BYTES = 3000


def _short_component(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """``name`` cut at a character boundary to fit ``limit`` bytes, with a hash of the
    whole name (so two long names never collide) and the original suffix."""
    if len(os.fsencode(name)) <= limit:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    suffix = PurePosixPath(name).suffix
    if len(os.fsencode(suffix)) > 16:
        suffix = ""
    room = limit - len(os.fsencode(f"~{digest}{suffix}"))
    stem = name[: len(name) - len(suffix)] if suffix else name
    while len(os.fsencode(stem)) > room:
        stem = stem[: max(1, len(stem) * room // max(len(os.fsencode(stem)), 1))]
        if len(os.fsencode(stem)) > room:
            stem = stem[:-1]
    return f"{stem}~{digest}{suffix}"


def local_member_path(rel: PurePosixPath) -> tuple[PurePosixPath, bool]:
    """A path the local file system can hold for member ``rel``, and whether it changed.

    Names decoded as cp866 grow to two bytes per Cyrillic letter in UTF-8, so a
    name that fitted on Windows may pass the 255-byte limit here; such names are
    shortened, never fatal.
    """
    parts = [_short_component(p) for p in rel.parts]
    short = PurePosixPath(*parts)
    if len(os.fsencode(str(short))) > MAX_PATH_BYTES:
        digest = hashlib.sha256(str(rel).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        short = PurePosixPath("_long_paths", _short_component(f"{digest}~{parts[-1]}"))
    return short, short != rel


def _is_link(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return stat.S_ISLNK(mode)


def _check_declared(infos: list[zipfile.ZipInfo], archive: Path, limits: ArchiveLimits) -> None:
    if len(infos) > limits.max_members:
        raise UnsafeArchiveError(
            f"{archive.name} holds {len(infos)} entries, more than the limit of "
            f"{limits.max_members}; split it into smaller archives."
        )
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        raise UnsafeArchiveError(
            f"{archive.name} would expand to {total / 1024**3:.1f} GiB, more than the limit "
            f"of {limits.max_total_bytes / 1024**3:.1f} GiB; split it into smaller archives."
        )
    for info in infos:
        if info.file_size >= limits.ratio_min_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_ratio:
                raise UnsafeArchiveError(
                    f"{archive.name} member {decode_member_name(info)!r} expands {ratio:.0f}-fold "
                    f"(limit {limits.max_ratio:.0f}); the archive looks like a decompression "
                    "bomb and is refused."
                )


def _copy_bounded(
    src: zipfile.ZipExtFile,
    dst: Path,
    info: zipfile.ZipInfo,
    budget: int,
    archive: Path,
    limits: ArchiveLimits,
) -> int:
    """Copy one member, stopping as soon as it writes more than it claimed."""
    allowed = min(info.file_size, budget)
    written = 0
    with open(dst, "wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > allowed:
                raise UnsafeArchiveError(
                    f"{archive.name} member {decode_member_name(info)!r} expands beyond its "
                    "declared size or the archive's size limit; the archive is refused."
                )
            out.write(chunk)
    if (
        written >= limits.ratio_min_bytes
        and written / max(info.compress_size, 1) > limits.max_ratio
    ):
        raise UnsafeArchiveError(
            f"{archive.name} member {decode_member_name(info)!r} expands beyond the ratio "
            f"limit of {limits.max_ratio:.0f}; the archive looks like a decompression bomb."
        )
    return written


def extract_zip(
    archive: Path, target: Path, *, limits: ArchiveLimits | None = None
) -> tuple[list[Path], list[str]]:
    """Extract ``archive`` into ``target`` safely.

    Returns:
        The files written, and one sentence per member that was skipped
        (a link, or a damaged member that could not be decompressed).

    Args:
        archive: the zip file.
        target: an existing, run-owned empty folder.
        limits: bounds on member count, size and ratio.

    Raises:
        InputError: the file is not a readable zip archive.
        UnsafeArchiveError: the archive breaks a safety bound; nothing outside
            ``target`` was written, and ``target`` is emptied.
    """
    limits = limits or ArchiveLimits()
    target = target.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(
            f"{archive.name} is not a readable zip archive ({exc}); check that the "
            "download or copy finished."
        ) from exc
    written: list[Path] = []
    skipped: list[str] = []
    try:
        with zf:
            infos = zf.infolist()
            _check_declared(infos, archive, limits)
            free = shutil.disk_usage(target).free
            needed = sum(i.file_size for i in infos)
            if needed > free:
                raise UnsafeArchiveError(
                    f"{archive.name} needs {needed / 1024**3:.1f} GiB to extract but only "
                    f"{free / 1024**3:.1f} GiB is free; free disk space or set TMPDIR."
                )
            budget = limits.max_total_bytes
            for info in infos:
                rel = safe_member_path(decode_member_name(info))
                if rel is None:
                    continue
                if _is_link(info):
                    skipped.append(f"{archive.name}: skipped symbolic link member {rel}")
                    continue
                local, shortened = local_member_path(rel)
                if shortened:
                    skipped.append(
                        f"{archive.name}: member name {str(rel)[:60]!r}… is too long for this "
                        f"file system and was written as {str(local)[:60]!r}…"
                    )
                dst = target.joinpath(*local.parts)
                if not dst.resolve().is_relative_to(target):  # defence in depth
                    raise UnsafeArchiveError(
                        f"archive member {str(rel)!r} resolves outside the work area; refused."
                    )
                try:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src:
                        budget -= _copy_bounded(src, dst, info, budget, archive, limits)
                except (
                    zipfile.BadZipFile,
                    zlib.error,
                    EOFError,
                    OSError,
                    NotImplementedError,
                ) as exc:
                    skipped.append(
                        f"{archive.name}: member {rel} is damaged and was skipped ({exc})"
                    )
                    with contextlib.suppress(OSError):
                        dst.unlink(missing_ok=True)
                    continue
                written.append(dst)
    except UnsafeArchiveError:
        _empty_folder(target)
        raise
    for message in skipped:
        log.warning(message)
    return written, skipped


def _empty_folder(folder: Path) -> None:
    """Remove what an extraction wrote; never raises (it runs while an error is handled)."""
    try:
        children = list(folder.iterdir())
    except OSError:
        return
    for child in children:
        try:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove %s from the work area: %s", child, exc)
