"""The patient and study values of a scored series, read once and cleaned for writing.

Every DICOM object ctscreen sends back (the SR, the key images, a "not screened"
report) belongs to the received study: it repeats the Patient and General Study
modules of the images it was made from. Real exports fill those modules in every
way the standard allows and many it does not: attributes missing or empty, dates
such as ``2025-13-45``, ages such as ``45``, names over 64 characters, a character
set of ``ISO_IR 144`` (Cyrillic) or ``ISO_IR 192`` (UTF-8), or none.

:class:`StudyHeader` is what the reader keeps of them, read from the header it
parses anyway (no file is opened again): each value checked against its value
representation, an invalid one replaced by an empty value with a sentence saying
so, private and retired attributes never carried. The writers build their objects
from it, so a header that the standard would refuse never reaches them.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field, replace

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

#: The attributes carried, with their value representation, in the order they are written.
#: Patient module, Patient Study module (age), General Study module, then the frame of
#: reference and body part the key images and the localisation box need.
CARRIED: tuple[tuple[str, str], ...] = (
    ("PatientName", "PN"),
    ("PatientID", "LO"),
    ("IssuerOfPatientID", "LO"),
    ("PatientBirthDate", "DA"),
    ("PatientSex", "CS"),
    ("PatientAge", "AS"),
    ("StudyDate", "DA"),
    ("StudyTime", "TM"),
    ("ReferringPhysicianName", "PN"),
    ("StudyID", "SH"),
    ("AccessionNumber", "SH"),
    ("StudyDescription", "LO"),
    ("FrameOfReferenceUID", "UI"),
    ("BodyPartExamined", "CS"),
)
#: Type 2 attributes of the Patient and General Study modules: always written, empty if unknown.
TYPE_2: frozenset[str] = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    }
)
_MAX_LENGTH = {"LO": 64, "SH": 16, "CS": 16, "UI": 64}
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_CS = re.compile(r"^[A-Z0-9 _]*$")
_AGE = re.compile(r"^[0-9]{3}[DWMY]$")
_TIME = re.compile(r"^([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9]|60)?)?(\.[0-9]{1,6})?$")
_SEX = frozenset({"M", "F", "O"})
#: The character set written when the received one is unknown and a value is not ASCII.
UTF8 = "ISO_IR 192"


def plain_text(value: object) -> str:
    """A tag value as text without padding: spaces and NULs at either end dropped,
    bytes (an element pydicom could not convert) decoded as Latin-1, None as ""."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip().strip("\x00").strip()


def valid_uid(uid: str) -> bool:
    """A UID the standard allows: at most 64 characters, digits in dot-separated
    components without leading zeros."""
    return 0 < len(uid) <= 64 and bool(_UID.match(uid))


def clean_value(keyword: str, vr: str, raw: str) -> tuple[str, str]:
    """``raw`` as it may be written for ``keyword`` (value representation ``vr``), and a
    sentence saying what was dropped ("" when the value is kept as it was).

    An invalid value becomes "" (dates, times, ages, names, codes that the standard
    would refuse); a legacy date ``YYYY.MM.DD`` or time ``HH:MM:SS`` is rewritten.
    """
    text = raw
    if not text:
        return "", ""
    if vr == "DA":
        digits = text.replace(".", "") if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", text) else text
        try:
            dt.datetime.strptime(digits, "%Y%m%d")
        except ValueError:
            digits = ""
        if len(digits) == 8:
            return digits, ""
        return "", f"{keyword} {text!r} is not a date (YYYYMMDD) and was left empty"
    if vr == "TM":
        candidate = text.replace(":", "") if re.fullmatch(r"\d{2}:\d{2}(:\d{2})?", text) else text
        if _TIME.match(candidate):
            return candidate, ""
        return "", f"{keyword} {text!r} is not a time (HHMMSS) and was left empty"
    if vr == "AS":
        if _AGE.match(text):
            return text, ""
        return "", f"{keyword} {text!r} is not an age (nnnD/W/M/Y) and was left out"
    if vr == "PN":
        groups = text.split("=")
        ok = (
            len(groups) <= 3
            and all(len(g) <= 64 and g.count("^") <= 4 for g in groups)
            and not any(ord(c) < 32 and c != "\x1b" for c in text)
            and "\\" not in text
        )
        if ok:
            return text, ""
        return (
            "",
            f"{keyword} is not a valid person name (too long or malformed) and was left empty",
        )
    if vr == "CS":
        value = text.upper() if keyword == "PatientSex" else text
        if keyword == "PatientSex" and value not in _SEX:
            return "", f"PatientSex {text!r} is not M, F or O and was left empty"
        if len(value) > _MAX_LENGTH["CS"] or not _CS.match(value):
            return "", f"{keyword} {text!r} is not a code string and was left out"
        return value, ""
    if vr == "UI":
        if valid_uid(text):
            return text, ""
        return "", f"{keyword} {text!r} is not a valid UID and was left out"
    limit = _MAX_LENGTH.get(vr, 64)
    if len(text) > limit or "\\" in text or any(ord(c) < 32 and c != "\x1b" for c in text):
        return "", f"{keyword} is longer than {limit} characters or malformed and was left empty"
    return text, ""


def _charset(ds: Dataset) -> str:
    value = ds.get("SpecificCharacterSet", "")
    if isinstance(value, list | tuple) or hasattr(value, "__iter__") and not isinstance(value, str):
        return "\\".join(str(v).strip() for v in value)
    return plain_text(value)


def single_set(charset: str) -> str:
    """A lone ISO 2022 term as the plain set it names (``ISO 2022 IR 6`` -> "",
    ``ISO 2022 IR 144`` -> ``ISO_IR 144``): code extensions with a single set are
    refused by pydicom's writer, so such a header (seen in real exports) could not be
    answered otherwise."""
    terms = [t.strip() for t in charset.split("\\")]
    if len(terms) == 1 and terms[0].startswith("ISO 2022 IR "):
        number = terms[0].removeprefix("ISO 2022 IR ").strip()
        return "" if number == "6" else f"ISO_IR {number}"
    return charset


def _known_charset(charset: str) -> bool:
    return all(
        term.strip() in python_encoding or term.strip() == "" for term in charset.split("\\")
    )


@dataclass(frozen=True)
class StudyHeader:
    """The cleaned Patient/Study values of a scored series and its instances.

    Attributes:
        study_uid: StudyInstanceUID as received (the study's identity: kept even when
            it breaks the UID rules, which ``warnings`` then says).
        series_uid: SeriesInstanceUID of the series the values come from.
        values: ``(keyword, value)`` of :data:`CARRIED`, cleaned; "" for unknown.
        character_set: SpecificCharacterSet to write ("" for the default repertoire).
        instances: ``(SOPClassUID, SOPInstanceUID, NumberOfFrames)`` of the series'
            instances (the evidence an SR references; 1 frame for a single-frame image).
        warnings: one sentence per value that was dropped or rewritten.
    """

    study_uid: str
    series_uid: str = ""
    values: tuple[tuple[str, str], ...] = ()
    character_set: str = ""
    instances: tuple[tuple[str, str, int], ...] = ()
    warnings: tuple[str, ...] = field(default=())
    rows: int = 0
    columns: int = 0

    def get(self, keyword: str) -> str:
        """The cleaned value of ``keyword`` ("" when unknown)."""
        return dict(self.values).get(keyword, "")

    def with_instances(
        self,
        series_uid: str,
        instances: tuple[tuple[str, str, int], ...],
        *,
        rows: int = 0,
        columns: int = 0,
    ) -> StudyHeader:
        """This header for the scored series ``series_uid``, its instances and image size."""
        return replace(self, series_uid=series_uid, instances=instances, rows=rows, columns=columns)

    def to_json(self) -> dict[str, object]:
        """A JSON-able dict (:meth:`from_json` reads it back)."""
        return {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "values": dict(self.values),
            "character_set": self.character_set,
            "instances": [list(i) for i in self.instances],
            "warnings": list(self.warnings),
            "rows": self.rows,
            "columns": self.columns,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> StudyHeader:
        values = data.get("values") or {}
        assert isinstance(values, dict)
        return cls(
            study_uid=str(data.get("study_uid", "")),
            series_uid=str(data.get("series_uid", "")),
            values=tuple((k, str(v)) for k, v in values.items()),
            character_set=str(data.get("character_set", "")),
            instances=tuple(
                (str(i[0]), str(i[1]), int(i[2]) if len(i) > 2 else 1)
                for i in data.get("instances") or ()  # type: ignore[union-attr]
            ),
            warnings=tuple(str(w) for w in data.get("warnings") or ()),  # type: ignore[union-attr]
            rows=int(data.get("rows") or 0),  # type: ignore[call-overload]
            columns=int(data.get("columns") or 0),  # type: ignore[call-overload]
        )

    def dataset(
        self, sop_class_uid: str = "", sop_instance_uid: str = "", frames: int = 1
    ) -> Dataset:
        """A header-only dataset holding these values (every Type 2 attribute present,
        empty when unknown), for highdicom to copy into the objects it builds.

        Args:
            sop_class_uid, sop_instance_uid, frames: the instance it stands for (the
                first instance of :attr:`instances` when empty).
        """
        if not sop_instance_uid and self.instances:
            sop_class_uid, sop_instance_uid, frames = self.instances[0]
        ds = Dataset()
        if self.character_set:
            ds.SpecificCharacterSet = (
                self.character_set.split("\\") if "\\" in self.character_set else self.character_set
            )
        values = dict(self.values)
        for keyword, _vr in CARRIED:
            value = values.get(keyword, "")
            if value or keyword in TYPE_2:
                setattr(ds, keyword, value)
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = self.series_uid
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = sop_instance_uid
        ds.Modality = "CT"
        if self.rows and self.columns:
            ds.Rows, ds.Columns = self.rows, self.columns
        if frames > 1:
            ds.NumberOfFrames = frames
        return ds


def read_study_header(ds: Dataset) -> StudyHeader:
    """The cleaned values of one received instance's header (never raises on values)."""
    warnings: list[str] = []
    values: list[tuple[str, str]] = []
    for keyword, vr in CARRIED:
        try:
            raw = plain_text(ds.get(keyword, ""))
        except (ValueError, TypeError, AttributeError, LookupError, OverflowError):
            raw, note = "", f"{keyword} could not be read and was left empty"
            warnings.append(note)
        value, note = clean_value(keyword, vr, raw)
        if note:
            warnings.append(note)
        values.append((keyword, value))
    study_uid = _safe_text(ds, "StudyInstanceUID")
    if study_uid and not valid_uid(study_uid):
        warnings.append(
            f"StudyInstanceUID {study_uid!r} breaks the UID rules; it is kept so that the "
            "results join the study, but a strict PACS may refuse them"
        )
    charset = single_set(_charset(ds))
    if charset and not _known_charset(charset):
        warnings.append(
            f"SpecificCharacterSet {charset!r} is unknown; results are written in UTF-8"
        )
        charset = UTF8
    if not charset and any(not v.isascii() for _, v in values):
        charset = UTF8
    return StudyHeader(
        study_uid=study_uid,
        series_uid=_safe_text(ds, "SeriesInstanceUID"),
        values=tuple(values),
        character_set=charset,
        warnings=tuple(warnings),
    )


def fit_character_set(ds: Dataset) -> None:
    """Switch ``ds`` to UTF-8 (ISO_IR 192) when one of its texts cannot be written in the
    character set it names (a Latin-1 study whose report quotes a non-Latin sentence)."""
    charset = ds.get("SpecificCharacterSet") or "ISO_IR 6"
    terms = [charset] if isinstance(charset, str) else list(charset)
    encodings = [python_encoding.get(str(t).strip() or "ISO_IR 6", "ascii") for t in terms]
    if any("2022" in str(t) for t in terms):
        return  # code extensions switch sets inside a value: pydicom handles them
    for element in ds.iterall():
        if element.VR not in _TEXT_VRS or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            text = str(value)
            if text.isascii():
                continue
            try:
                text.encode(encodings[0])
            except (UnicodeEncodeError, LookupError):
                ds.SpecificCharacterSet = UTF8
                return


_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})


def _safe_text(ds: Dataset, keyword: str) -> str:
    try:
        return plain_text(ds.get(keyword, ""))
    except (ValueError, TypeError, AttributeError, LookupError):
        return ""


__all__ = [
    "CARRIED",
    "StudyHeader",
    "clean_value",
    "fit_character_set",
    "plain_text",
    "read_study_header",
    "valid_uid",
]
