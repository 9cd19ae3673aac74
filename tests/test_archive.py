"""Safe zip extraction: zip-slip, bombs, limits and cp866 names."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from ctscreen.dicom.archive import ArchiveLimits, decode_member_name, extract_zip, safe_member_path
from ctscreen.errors import InputError, UnsafeArchiveError


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extracts_nested_members(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"top/sub/one": b"1", "top/two.dcm": b"22", "top/dir/": b""})
    work = tmp_path / "work"
    work.mkdir()
    files, skipped = extract_zip(archive, work)
    assert sorted(p.relative_to(work).as_posix() for p in files) == ["top/sub/one", "top/two.dcm"]
    assert (work / "top" / "two.dcm").read_bytes() == b"22"
    assert skipped == []


@pytest.mark.parametrize(
    "name", ["../evil.txt", "top/../../evil.txt", "/etc/evil.txt", "C:/evil.txt"]
)
def test_zip_slip_is_refused_and_writes_nothing_outside(tmp_path: Path, name: str) -> None:
    archive = _zip(tmp_path / "slip.zip", {"ok/file": b"fine", name: b"evil"})
    work = tmp_path / "area" / "work"
    work.mkdir(parents=True)
    with pytest.raises(UnsafeArchiveError):
        extract_zip(archive, work)
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "area" / "evil.txt").exists()
    assert list(work.iterdir()) == []


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bomb.zip", {"zeros": b"\0" * (40 * 1024 * 1024)})
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeArchiveError, match="decompression bomb"):
        extract_zip(archive, work)
    assert list(work.iterdir()) == []


def test_total_size_and_member_count_limits(tmp_path: Path) -> None:
    archive = _zip(
        tmp_path / "many.zip", {f"f{i}": bytes(100) for i in range(20)}, zipfile.ZIP_STORED
    )
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeArchiveError, match="entries"):
        extract_zip(archive, work, limits=ArchiveLimits(max_members=10))
    with pytest.raises(UnsafeArchiveError, match="GiB"):
        extract_zip(archive, work, limits=ArchiveLimits(max_total_bytes=1000))


def test_not_a_zip_is_an_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 this is truncated")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InputError, match="not a readable zip"):
        extract_zip(bad, work)


def _patch_name(data: bytes, placeholder: bytes, raw: bytes) -> bytes:
    assert len(placeholder) == len(raw)
    return data.replace(placeholder, raw)


def test_cp866_names_without_utf8_flag_decode_to_cyrillic(tmp_path: Path) -> None:
    raw = "Датасет".encode("cp866")
    placeholder = b"X" * len(raw)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(placeholder.decode() + "/study/slice1", b"data")
    archive = tmp_path / "win.zip"
    archive.write_bytes(_patch_name(buf.getvalue(), placeholder, raw))
    with zipfile.ZipFile(archive) as zf:
        (info,) = zf.infolist()
        assert not info.flag_bits & 0x800
        assert decode_member_name(info) == "Датасет/study/slice1"
    work = tmp_path / "work"
    work.mkdir()
    files, _ = extract_zip(archive, work)
    assert files == [work / "Датасет" / "study" / "slice1"]


def test_utf8_names_with_flag_are_kept(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "u.zip", {"Датасет/один": b"1"})
    work = tmp_path / "work"
    work.mkdir()
    files, _ = extract_zip(archive, work)
    assert files == [work / "Датасет" / "один"]


def test_safe_member_path_rules() -> None:
    assert safe_member_path("a/./b//c") is not None
    assert str(safe_member_path("a\\b\\c")) == "a/b/c"
    assert safe_member_path("folder/") is None
    with pytest.raises(UnsafeArchiveError):
        safe_member_path("a/../../b")
