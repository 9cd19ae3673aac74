"""Property-based hostile inputs: nothing may crash, hang, or come out as an untrustworthy number.

Hypothesis generates damaged and odd inputs from a small synthetic chest series
and from the real public CT files: mutated header values (NaN, infinities, zero,
absurd, missing, wrong type), mutated byte streams (flips, cuts, zeroed runs,
insertions), odd containers (zips, zips in zips, cut zips, over-long cp866
names, links), special files (named pipes, sockets, links out of the input) and
real files cut or flipped. Every generated input is scored end to end by the one
:class:`ctscreen.Screener` with a tiny model, and every result must be either a
Success with a finite probability in [0, 1] (and finite slice scores and box) or
a Failure whose one sentence names the file, the input or the DICOM tag at fault.

A crash is any exception out of ``Screener.score`` or a Failure that only the
catch-all caught ("unexpected error"); a hang is a study stopped by the time
limit. The suite asserts there are none. Examples are derandomised (the same in
every CI run) and counted per family; the totals are printed at the end.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import struct
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import keyword_dict
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from conftest import make_checkpoint
from ctscreen import Screener
from ctscreen.synth.dicom_writer import write_series
from ctscreen.synth.phantom import make_phantom

#: Small enough for a fast end-to-end score: 18 slices of 32x32 at 10 mm.
BASE_SHAPE = (18, 32, 32)
BASE_SPACING = (10.0, 10.0, 10.0)
MODEL_INPUT = (8, 16, 16)
#: A study that takes longer than this is a hang (the Screener's own time limit).
HANG_SECONDS = 60.0
#: Examples per family; together at least 300 inputs in every CI run.
EXAMPLES = {"header": 110, "bytes": 90, "container": 50, "special": 30, "real": 30}

COUNTS: Counter[str] = Counter()

HOSTILE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def hostile(family: str) -> settings:
    """The suite's settings with this family's fixed number of examples."""
    return settings(HOSTILE, max_examples=EXAMPLES[family])


DICOM_KEYWORDS = frozenset(keyword_dict)


@dataclass
class Env:
    screener: Screener
    base: Path
    files: list[Path]
    root: Path
    real_files: list[Path]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("hostile")
    # A network input of 8x16x16 and one thread: hundreds of forwards stay cheap, and on
    # a busy 2-core machine two OpenMP threads spin against each other (20x slower).
    checkpoint = make_checkpoint(root / "model.pth", shape=MODEL_INPUT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    phantom = make_phantom(seed=3, shape=BASE_SHAPE, spacing=BASE_SPACING)
    files = write_series(
        phantom.hu,
        spacing=BASE_SPACING,
        out_dir=root / "base",
        study_uid="1.2.826.0.1.3680043.10.99",
        series_uid="1.2.826.0.1.3680043.10.99.1",
        origin=(-155.0, -155.0, -90.0),
        seed=3,
    )
    screener = Screener(
        checkpoint,
        device="cpu",
        backend="torch",
        precision="fp32",
        min_slices=8,
        study_timeout=HANG_SECONDS,
    )
    real_root = Path(
        os.environ.get(
            "CTSCREEN_TEST_DICOM", Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
        )
    )
    real = sorted(
        p
        for p in real_root.rglob("*")
        if p.is_file() and p.suffix.lower() not in (".md", ".xml") and p.stat().st_size < 600_000
    )
    yield Env(screener, root / "base", sorted(files), root, real)
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the oracle


def _names_under(folder: Path) -> set[str]:
    names = {folder.name}
    for _dirpath, dirnames, filenames in os.walk(folder):
        names.update(dirnames)
        names.update(filenames)
    return {n for n in names if len(n) >= 3}


def _names_something(error: str, names: set[str]) -> bool:
    if any(name in error for name in names):
        return True
    words = set(error.replace("(", " ").replace(")", " ").replace(",", " ").split())
    return bool(words & DICOM_KEYWORDS)


def score_and_check(env: Env, family: str, build: Callable[[Path], list[Path]]) -> None:
    """Build one hostile input in a fresh folder, score it, and check every result."""
    case = Path(tempfile.mkdtemp(dir=env.root, prefix=f"{family}-"))
    try:
        inputs = build(case)
        names = _names_under(case) | {p.name for p in inputs}
        results = list(env.screener.score(inputs))  # any exception here is a crash
        COUNTS[family] += 1
        COUNTS["inputs"] += 1
        assert {r.input_path for r in results} >= {str(p) for p in inputs}
        for r in results:
            assert r.status in ("Success", "Failure")
            if r.ok:
                COUNTS["success"] += 1
                assert r.probability is not None and math.isfinite(r.probability)
                assert 0.0 <= r.probability <= 1.0
                assert r.logit is not None and math.isfinite(r.logit)
                assert r.slice_scores is not None and np.isfinite(r.slice_scores).all()
                assert r.box is None or all(math.isfinite(v) for v in r.box)
                continue
            COUNTS["failure"] += 1
            if os.environ.get("CTSCREEN_HOSTILE_LOG"):
                with open(os.environ["CTSCREEN_HOSTILE_LOG"], "a") as log:
                    log.write(f"{family}\t{r.error}\n")
            assert "time limit" not in r.error, f"hang: {r.error}"
            assert not r.error.startswith("unexpected error"), f"crash: {r.error}"
            assert r.error and "\n" not in r.error and "Traceback" not in r.error
            assert _names_something(r.error, names), f"names no file or tag: {r.error}"
    finally:
        shutil.rmtree(case, ignore_errors=True)


def _copy_base(env: Env, case: Path) -> list[Path]:
    folder = case / "study"
    shutil.copytree(env.base, folder)
    return sorted(folder.iterdir())


# --------------------------------------------------------------------------- header values

_SPECIAL_NUMBERS = ["NaN", "nan", "inf", "-inf", "Infinity", "0", "-0", "-1", "1e30", "-1e30"]
_SPECIAL_NUMBERS += ["1e-30", "1e308", "2147483648", "", " ", "abc", "1,5", "0x10", "--1"]
_ds_atom = st.sampled_from(_SPECIAL_NUMBERS) | st.floats(allow_nan=True).map(lambda f: f"{f:.6g}")
_ds_value = st.lists(_ds_atom, min_size=0, max_size=7).map("\\".join)
_is_value = st.sampled_from(["0", "-1", "999999", "2147483647", "abc", "1.5", "", "2", "17"]) | (
    st.integers(-(10**9), 10**9).map(str)
)
_us_value = st.integers(0, 65535) | st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 32, 64])
_text_value = st.text(st.characters(codec="latin-1", exclude_characters="\\\x00"), max_size=40)

#: keyword -> (VR, strategy of values)
HEADER_TAGS: dict[str, tuple[str, st.SearchStrategy[object]]] = {
    "RescaleSlope": ("DS", _ds_value),
    "RescaleIntercept": ("DS", _ds_value),
    "PixelSpacing": ("DS", _ds_value),
    "ImagePositionPatient": ("DS", _ds_value),
    "ImageOrientationPatient": ("DS", _ds_value),
    "SliceThickness": ("DS", _ds_value),
    "GantryDetectorTilt": ("DS", _ds_value),
    "NumberOfFrames": ("IS", _is_value),
    "InstanceNumber": ("IS", _is_value),
    "Rows": ("US", _us_value),
    "Columns": ("US", _us_value),
    "BitsAllocated": ("US", _us_value),
    "BitsStored": ("US", _us_value),
    "HighBit": ("US", _us_value),
    "PixelRepresentation": ("US", _us_value),
    "SamplesPerPixel": ("US", _us_value),
    "StudyInstanceUID": ("UI", _text_value),
    "SeriesInstanceUID": ("UI", _text_value),
    "SOPInstanceUID": ("UI", _text_value),
    "SOPClassUID": ("UI", st.sampled_from(["1.2.840.10008.5.1.4.1.1.7", "", "1.2.3"])),
    "Modality": ("CS", st.sampled_from(["MR", "", "CT", "SR"]) | _text_value),
    "ImageType": ("CS", st.sampled_from(["ORIGINAL\\PRIMARY\\LOCALIZER", ""]) | _text_value),
    "BodyPartExamined": ("CS", st.sampled_from(["HEAD", "CHEST", "ABDOMEN"]) | _text_value),
    "PhotometricInterpretation": ("CS", st.sampled_from(["MONOCHROME1", "RGB", "PALETTE"])),
}


@st.composite
def header_mutations(draw: st.DrawFn) -> list[tuple[str, str, object, str]]:
    """1-3 edits ``(keyword, VR, value or None to delete, scope: one|half|all)``."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        keyword = draw(st.sampled_from(sorted(HEADER_TAGS)))
        vr, values = HEADER_TAGS[keyword]
        value = draw(st.none() | values)
        scope = draw(st.sampled_from(["one", "half", "all"]))
        edits.append((keyword, vr, value, scope))
    return edits


def _apply_header_edit(files: list[Path], keyword: str, vr: str, value: object, scope: str) -> None:
    chosen = {"one": files[len(files) // 2 : len(files) // 2 + 1], "half": files[::2]}.get(
        scope, files
    )
    for path in chosen:
        ds = pydicom.dcmread(path, force=True)
        if value is None:
            if keyword in ds:
                del ds[keyword]
        else:
            ds[keyword] = _raw_element(keyword, vr, value)
        ds.save_as(path, enforce_file_format=False)


def _raw_element(keyword: str, vr: str, value: object) -> RawDataElement:
    """The element as raw bytes, so that values pydicom itself would refuse reach the file."""
    if vr == "US":
        data = struct.pack("<H", int(value))  # type: ignore[call-overload]
    else:
        data = str(value).encode("latin-1")
        data += b" " if len(data) % 2 else b""
    tag = Tag(keyword)
    return RawDataElement(tag, vr, len(data), data, 0, False, True)


def test_mutated_header_values(env: Env) -> None:
    @hostile("header")
    @given(edits=header_mutations())
    def run(edits: list[tuple[str, str, object, str]]) -> None:
        def build(case: Path) -> list[Path]:
            files = _copy_base(env, case)
            for keyword, vr, value, scope in edits:
                _apply_header_edit(files, keyword, vr, value, scope)
            return [case / "study"]

        score_and_check(env, "header", build)

    run()
    assert COUNTS["header"] >= EXAMPLES["header"] * 0.9


# --------------------------------------------------------------------------- byte streams


@st.composite
def byte_mutations(draw: st.DrawFn) -> list[tuple[str, int, float, float, bytes]]:
    """1-4 edits ``(kind, file index, position, extent, bytes)`` on the series' files."""
    kinds = st.sampled_from(["flip", "truncate", "zero", "insert", "empty", "swap"])
    return [
        (
            draw(kinds),
            draw(st.integers(0, BASE_SHAPE[0] - 1)),
            draw(st.floats(0.0, 1.0)),
            draw(st.floats(0.0, 0.5)),
            draw(st.binary(min_size=1, max_size=16)),
        )
        for _ in range(draw(st.integers(1, 4)))
    ]


def _mutate_bytes(data: bytes, kind: str, pos: float, extent: float, payload: bytes) -> bytes:
    at = min(int(pos * len(data)), max(len(data) - 1, 0))
    if kind == "flip" and data:
        return (
            data[:at] + bytes([data[at] ^ 0xFF]) + payload[:4] + data[at + 1 + len(payload[:4]) :]
        )
    if kind == "truncate":
        return data[:at]
    if kind == "zero":
        n = int(extent * len(data))
        return data[:at] + b"\0" * n + data[at + n :]
    if kind == "insert":
        return data[:at] + payload + data[at:]
    if kind == "empty":
        return b""
    return data


def test_mutated_byte_streams(env: Env) -> None:
    @hostile("bytes")
    @given(edits=byte_mutations())
    def run(edits: list[tuple[str, int, float, float, bytes]]) -> None:
        def build(case: Path) -> list[Path]:
            files = _copy_base(env, case)
            for kind, index, pos, extent, payload in edits:
                path = files[index % len(files)]
                if kind == "swap":  # two files trade contents (a mislabelled export)
                    other = files[(index + 5) % len(files)]
                    a, b = path.read_bytes(), other.read_bytes()
                    path.write_bytes(b)
                    other.write_bytes(a)
                    continue
                path.write_bytes(_mutate_bytes(path.read_bytes(), kind, pos, extent, payload))
            return [case / "study"]

        score_and_check(env, "bytes", build)

    run()
    assert COUNTS["bytes"] >= EXAMPLES["bytes"] * 0.9


# --------------------------------------------------------------------------- containers


def _zip_folder(folder: Path, archive: Path, *, names: Callable[[str], str]) -> None:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, names(path.relative_to(folder.parent).as_posix()))


#: A folder name that a Windows archiver stores in cp866 without the UTF-8 flag; in
#: UTF-8 it takes 2 bytes a letter, 400 in all, past the 255-byte name limit.
CP866_FOLDER = "Датасет_" * 25
_PLACEHOLDER = b"P" * len(CP866_FOLDER.encode("cp866"))


def _zip_cp866(folder: Path, archive: Path) -> None:
    """Zip ``folder`` under :data:`CP866_FOLDER`, as raw cp866 bytes without the UTF-8 flag
    (written with an ASCII placeholder of the same length, then patched in place)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"{_PLACEHOLDER.decode()}/{path.name}")
    data = archive.read_bytes().replace(_PLACEHOLDER, CP866_FOLDER.encode("cp866"))
    archive.write_bytes(data)


@st.composite
def containers(draw: st.DrawFn) -> dict[str, object]:
    return {
        "depth": draw(st.integers(0, 6)),
        "naming": draw(st.sampled_from(["plain", "long", "cyrillic-cp866", "deep-folders"])),
        "cut": draw(st.none() | st.floats(0.05, 0.99)),
        "junk": draw(st.lists(st.binary(max_size=64), max_size=3)),
        "link_member": draw(st.booleans()),
        "empty": draw(st.integers(0, 9)) == 9,  # an empty archive now and then
    }


def test_odd_containers(env: Env) -> None:
    @hostile("container")
    @given(spec=containers())
    def run(spec: dict[str, object]) -> None:
        def build(case: Path) -> list[Path]:
            _copy_base(env, case)
            archive = case / "study.zip"
            if spec["empty"]:
                with zipfile.ZipFile(archive, "w"):
                    pass
                return [archive]
            naming = {
                "plain": lambda n: n,
                "long": lambda n: n.replace("study/", "study/" + "x" * 300 + "/"),
                "cyrillic-cp866": lambda n: n,
                "deep-folders": lambda n: n.replace("study/", "study/" + "a/" * 40),
            }[str(spec["naming"])]
            if spec["naming"] == "cyrillic-cp866":
                _zip_cp866(case / "study", archive)
            else:
                _zip_folder(case / "study", archive, names=naming)
            with zipfile.ZipFile(archive, "a") as zf:
                for k, junk in enumerate(spec["junk"]):  # type: ignore[arg-type]
                    zf.writestr(f"study/junk{k}", junk)
                if spec["link_member"]:
                    info = zipfile.ZipInfo("study/link")
                    info.external_attr = 0o120777 << 16
                    zf.writestr(info, "/etc/passwd")
            for level in range(int(spec["depth"])):  # type: ignore[call-overload]
                outer = case / f"outer{level}.zip"
                with zipfile.ZipFile(outer, "w") as zf:
                    zf.write(archive, f"level{level}/{archive.name}")
                archive = outer
            if spec["cut"] is not None:
                data = archive.read_bytes()
                archive.write_bytes(data[: int(len(data) * float(spec["cut"]))])  # type: ignore[arg-type]
            shutil.rmtree(case / "study")
            return [archive]

        score_and_check(env, "container", build)

    run()
    assert COUNTS["container"] >= EXAMPLES["container"] * 0.9


# --------------------------------------------------------------------------- special files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="special files need a POSIX system")
def test_special_files(env: Env) -> None:
    kinds = ["fifo", "fifo-input", "socket", "link-out", "link-loop", "dir-as-dcm", "empty-file"]
    kinds += ["link-dev", "link-missing", "unreadable-name"]

    @hostile("special")
    @given(chosen=st.lists(st.sampled_from(kinds), min_size=1, max_size=4, unique=True))
    def run(chosen: list[str]) -> None:
        def build(case: Path) -> list[Path]:
            _copy_base(env, case)
            study = case / "study"
            inputs = [study]
            for kind in chosen:
                if kind == "fifo":
                    os.mkfifo(study / "pipe")
                elif kind == "fifo-input":
                    os.mkfifo(case / "pipe-input")
                    inputs.append(case / "pipe-input")
                elif kind == "socket":
                    with socket.socket(socket.AF_UNIX) as sock:
                        sock.bind(str(study / "sock"))
                elif kind == "link-out":
                    (study / "link-out").symlink_to(env.files[0])
                elif kind == "link-loop":
                    (study / "loop").symlink_to(study, target_is_directory=True)
                elif kind == "dir-as-dcm":
                    (study / "IM99999.dcm").mkdir()
                elif kind == "empty-file":
                    (study / "empty.dcm").write_bytes(b"")
                elif kind == "link-dev":
                    (study / "zero").symlink_to("/dev/zero")
                elif kind == "link-missing":
                    (study / "gone").symlink_to(case / "nothing-here")
                elif kind == "unreadable-name":
                    (study / os.fsdecode(b"\xff\xfe-bad-name")).write_bytes(b"DICM")
            return inputs

        score_and_check(env, "special", build)

    run()
    assert COUNTS["special"] >= EXAMPLES["special"] * 0.9


# --------------------------------------------------------------------------- real files


def test_mutated_real_files(env: Env) -> None:
    if not env.real_files:
        pytest.skip("real DICOM test data not found (set CTSCREEN_TEST_DICOM)")

    @hostile("real")
    @given(
        index=st.integers(0, 10**6),
        edits=st.lists(
            st.tuples(
                st.sampled_from(["flip", "truncate", "zero", "insert", "none"]),
                st.floats(0.0, 1.0),
                st.floats(0.0, 0.2),
                st.binary(min_size=1, max_size=8),
            ),
            max_size=3,
        ),
        with_series=st.booleans(),
    )
    def run(index: int, edits: list[tuple[str, float, float, bytes]], with_series: bool) -> None:
        def build(case: Path) -> list[Path]:
            source = env.real_files[index % len(env.real_files)]
            folder = _copy_base(env, case)[0].parent if with_series else case / "real"
            folder.mkdir(exist_ok=True)
            data = source.read_bytes()
            for kind, pos, extent, payload in edits:
                data = _mutate_bytes(data, kind, pos, extent, payload)
            (folder / f"real-{source.name}").write_bytes(data)
            return [folder]

        score_and_check(env, "real", build)

    run()
    assert COUNTS["real"] >= EXAMPLES["real"] * 0.9


def test_zz_totals(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """The figures of the run (printed with ``-s``); at least 300 inputs when all ran."""
    ran = [f for f in EXAMPLES if COUNTS[f]]
    with capsys.disabled():
        families = ", ".join(f"{f} {COUNTS[f]}" for f in EXAMPLES)
        print(
            f"\nhostile inputs: {COUNTS['inputs']} generated ({families}); results: "
            f"{COUNTS['success']} Success, {COUNTS['failure']} Failure; crashes 0, hangs 0"
        )
    if len(ran) == len(EXAMPLES):
        assert COUNTS["inputs"] >= 300
