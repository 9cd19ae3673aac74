"""What the dataset adapters share: the result type, tables, columns, labels, identities.

Each adapter (``covid19_1110``, ``mosmed_vii``, ``ldct_lungcr``, ``custom``) builds
registry rows from a dataset root with these helpers: the root check, reading the
dataset's own registry table, detecting its columns, label rules, patient ids, and
a study's identity from its DICOM headers (read through :mod:`ctscreen.dicom` only,
under its archive limits).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ...dicom.identity import read_study_identity
from ...errors import ConfigError, CtscreenError, DatasetError

log = logging.getLogger(__name__)

#: Adapter name -> human name of the dataset (used in messages and ``choices=``).
SOURCES: dict[str, str] = {
    "covid19_1110": "MosMedData COVID19_1110",
    "mosmed_vii": "MosMedData CT-COVID19 type VII",
    "ldct_lungcr": "MosMedData LDCT-LUNGCR type I",
    "custom": "custom class folders",
    "synthetic": "a synthetic dataset written by `ctscreen synth`",
}

#: File names an adapter looks for first when it needs the dataset's own registry table.
REGISTRY_TABLE_NAMES: tuple[str, ...] = ("dataset_registry.xlsx", "dataset_registry.csv")

#: PatientID values that identify nobody (anonymisers often write these).
_PLACEHOLDER_IDS = frozenset(
    {
        "",
        "anonymous",
        "anonymized",
        "anonymised",
        "anon",
        "unknown",
        "none",
        "null",
        "na",
        "n/a",
        "0",
        "-",
    }
)

LabelRule = Callable[[str], "int | None"]


@dataclass(frozen=True)
class AdapterResult:
    """What an adapter found under a dataset root.

    Attributes:
        rows: registry frame (:data:`ctscreen.data.registry.REGISTRY_COLUMNS`) of the
            studies that exist on disk and have a usable label.
        missing: one text per study the dataset lists but whose files are absent.
        notes: facts the user should know (skipped rows, assumptions made).
    """

    rows: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StudyHeader:
    """Identifiers read from one DICOM header of a study.

    Attributes:
        study_uid: StudyInstanceUID.
        patient_id: PatientID, ``""`` when absent or a placeholder.
        file: the file (or ``archive!member``) the header came from.
    """

    study_uid: str
    patient_id: str
    file: str


def require_root(root: str | os.PathLike[str], source: str) -> Path:
    """Check that a dataset root folder exists.

    Args:
        root: the folder.
        source: adapter name (key of :data:`SOURCES`).

    Returns:
        The root as a Path.

    Raises:
        DatasetError: the folder does not exist.
    """
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(
            f"dataset root {path} does not exist; download {SOURCES.get(source, source)} "
            "and pass its folder."
        )
    return path


def find_registry_table(root: Path) -> Path | None:
    """Find the dataset's own registry table in ``root``.

    ``dataset_registry.xlsx`` / ``.csv`` win; otherwise the only ``.xlsx``/``.csv`` file
    in ``root`` is taken. Several candidates and no standard name give ``None``.

    Args:
        root: dataset root.

    Returns:
        The table file, or ``None``.
    """
    for name in REGISTRY_TABLE_NAMES:
        if (root / name).is_file():
            return root / name
    found = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in {".xlsx", ".csv"} and not p.name.startswith(".")
    )
    return found[0] if len(found) == 1 else None


def missing_table_error(root: Path, source: str, expected: str) -> DatasetError:
    """Return the error for a dataset root without its registry table.

    Args:
        root: dataset root.
        source: adapter name.
        expected: what the root should hold, for the message.

    Returns:
        A DatasetError to raise.
    """
    return DatasetError(
        f"{root} holds no dataset_registry.xlsx or .csv; pass the {SOURCES.get(source, source)} "
        f"folder that contains {expected}."
    )


def read_table(path: Path) -> pd.DataFrame:
    """Read an xlsx (first sheet) or csv table with every cell as a stripped string.

    Args:
        path: the table.

    Returns:
        A frame of strings (``""`` for empty cells); integral floats such as ``1.0``
        become ``"1"``.

    Raises:
        DatasetError: the file is missing or cannot be read.
    """
    if not path.is_file():
        raise DatasetError(f"registry table {path} does not exist; check the dataset folder.")
    try:
        if path.suffix.lower() in {".xlsx", ".xlsm", ".xls"}:
            frame = pd.read_excel(path, sheet_name=0, dtype=object)
        else:
            frame = _read_csv_any_encoding(path)
    except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"cannot read registry table {path} ({exc}); check that it is a valid xlsx/csv file."
        ) from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.apply(lambda col: col.map(cell_text)).astype(object)


def _read_csv_any_encoding(path: Path) -> pd.DataFrame:
    """Read a CSV in UTF-8 (with or without BOM), else cp1251 (Russian Excel exports);
    the separator (comma, semicolon, tab) is sniffed."""
    try:
        return pd.read_csv(
            path, dtype=str, keep_default_na=False, sep=None, engine="python", encoding="utf-8-sig"
        )
    except UnicodeDecodeError:
        return pd.read_csv(
            path, dtype=str, keep_default_na=False, sep=None, engine="python", encoding="cp1251"
        )


def cell_text(value: object) -> str:
    """Render one table cell as stripped text (``""`` for empty, ``1.0`` -> ``"1"``).

    Args:
        value: the cell.

    Returns:
        The text.
    """
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    match = re.fullmatch(r"(-?\d+)\.0+", text)
    return match.group(1) if match else text


def normalise_name(name: str) -> str:
    """Lower-case a column name and turn spaces, dashes and dots into underscores.

    Args:
        name: column name.

    Returns:
        The normalised name (``"Study Instance-UID"`` -> ``"study_instance_uid"``).
    """
    return re.sub(r"[\s\-./]+", "_", name.strip().lower()).strip("_")


def read_registry_table(
    root: Path,
    source: str,
    synonyms: Mapping[str, Sequence[str]],
    *,
    required: Iterable[str],
    column_map: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """The dataset's own table in ``root`` (``dataset_registry.xlsx`` and a ``studies/``
    folder beside it) and which of its columns plays which role.

    Args:
        root: dataset root, already checked by :func:`require_root`.
        source: adapter name, for messages.
        synonyms, required, column_map: as :func:`resolve_columns` takes them.

    Returns:
        The table (every cell a stripped string) and role -> column.

    Raises:
        DatasetError: no table, or its columns cannot be matched to the roles.
    """
    table_path = find_registry_table(root)
    if table_path is None:
        raise missing_table_error(root, source, "dataset_registry.xlsx and studies/")
    table = read_table(table_path)
    cols = resolve_columns(
        list(table.columns),
        synonyms,
        required=required,
        column_map=column_map,
        table=str(table_path),
    )
    return table, cols


def resolve_columns(
    columns: Sequence[str],
    synonyms: Mapping[str, Sequence[str]],
    *,
    required: Iterable[str],
    column_map: Mapping[str, str] | None = None,
    table: str = "registry table",
) -> dict[str, str | None]:
    """Find which table column plays which role (study, label, patient, ...).

    An explicit ``column_map`` wins. Otherwise a role takes the column whose
    normalised name equals one of its synonyms; failing that, the column whose
    normalised name contains the role's first synonym token (e.g. ``study``). Two
    candidate columns for one role are ambiguous and raise.

    Args:
        columns: the table's column names.
        synonyms: role -> accepted names, most specific first (first item's first
            ``_``-token is the fallback substring).
        required: roles that must be found.
        column_map: role -> exact column name given by the user.
        table: table name for messages.

    Returns:
        role -> column name (``None`` for an optional role not found).

    Raises:
        ConfigError: ``column_map`` names an unknown role.
        DatasetError: a mapped column does not exist, or a required role is not found or
            ambiguous; the message lists the columns and how to pass a mapping.
    """
    column_map = dict(column_map or {})
    cols = list(columns)
    hint = (
        f"columns found: {', '.join(repr(c) for c in cols)}; pass a mapping such as "
        f"--column-map " + ",".join(f"{role}=COLUMN" for role in synonyms)
    )
    unknown_roles = sorted(set(column_map) - set(synonyms))
    if unknown_roles:
        raise ConfigError(
            f"column map names unknown role(s) {', '.join(unknown_roles)}; "
            f"roles are {', '.join(synonyms)}."
        )
    found: dict[str, str | None] = {}
    for role, col in column_map.items():
        if col not in cols:
            raise DatasetError(f"{table} has no column {col!r} (given for {role}); {hint}.")
        found[role] = col
    normalised = {c: normalise_name(c) for c in cols}
    ambiguous: dict[str, list[str]] = {}
    # Exact synonym matches first for every role, so that substring matching below
    # never steals a column another role names exactly.
    for role, names in synonyms.items():
        if role in found:
            continue
        wanted = {normalise_name(n) for n in names}
        hits = [c for c in cols if normalised[c] in wanted]
        if len(hits) == 1:
            found[role] = hits[0]
        elif len(hits) > 1:
            ambiguous[role] = hits
    taken = {c for c in found.values() if c}
    for role, names in synonyms.items():
        if role in found or role in ambiguous:
            continue
        token = normalise_name(names[0]).split("_")[0]
        hits = [c for c in cols if c not in taken and token in normalised[c]]
        if len(hits) == 1:
            found[role] = hits[0]
            taken.add(hits[0])
        elif len(hits) > 1:
            ambiguous[role] = hits
    for role in required:
        if role in ambiguous:
            raise DatasetError(
                f"{table}: the {role} column is ambiguous "
                f"({', '.join(repr(c) for c in ambiguous[role])}); {hint}."
            )
        if role not in found:
            raise DatasetError(f"{table}: no {role} column found; {hint}.")
    for role in synonyms:
        if role in ambiguous and role not in found:
            log.warning(
                "%s: %s column is ambiguous (%s); ignoring it",
                table,
                role,
                ", ".join(ambiguous[role]),
            )
        found.setdefault(role, None)
    return found


def normalise_value(value: str) -> str:
    """Normalise a label value for lookup: stripped, lower-case, ``1.0`` -> ``1``.

    Args:
        value: raw cell text.

    Returns:
        The normalised text.
    """
    return cell_text(value).lower()


def label_map_rule(label_map: Mapping[str, int | str]) -> LabelRule:
    """Build a label rule from an explicit value -> label mapping.

    Values not in the mapping give ``None`` (the row is skipped and reported).

    Args:
        label_map: raw value -> 0/1 (keys compared after :func:`normalise_value`).

    Returns:
        The rule.

    Raises:
        ConfigError: a mapped label is not 0 or 1.
    """
    table: dict[str, int] = {}
    for key, value in label_map.items():
        label = cell_text(value)
        if label not in {"0", "1"}:
            raise ConfigError(f"label map gives {key!r} the label {value!r}; labels are 0 or 1.")
        table[normalise_value(str(key))] = int(label)

    def rule(value: str) -> int | None:
        return table.get(normalise_value(value))

    return rule


def binary_rule(positive: Iterable[str], negative: Iterable[str]) -> LabelRule:
    """Build a strict label rule: positive values -> 1, negative values -> 0, else None.

    Args:
        positive: values meaning pathology.
        negative: values meaning no pathology.

    Returns:
        The rule.
    """
    pos = {normalise_value(v) for v in positive}
    neg = {normalise_value(v) for v in negative}

    def rule(value: str) -> int | None:
        v = normalise_value(value)
        if v in pos:
            return 1
        if v in neg:
            return 0
        return None

    return rule


def parse_key_values(text: str, *, what: str, example: str) -> dict[str, str]:
    """Parse ``"a=1,b=2"`` into ``{"a": "1", "b": "2"}``.

    Args:
        text: the option text.
        what: option name for messages (``"--mapping"``).
        example: a correct example for messages.

    Returns:
        The pairs, in order.

    Raises:
        ConfigError: an item lacks ``=``, has an empty side, or a key repeats.
    """
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ConfigError(f"{what} item {item.strip()!r} has no '='; write it like {example}.")
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not key or not value:
            raise ConfigError(
                f"{what} item {item.strip()!r} has an empty side; write it like {example}."
            )
        if key in pairs:
            raise ConfigError(f"{what} names {key!r} twice; give each name once.")
        pairs[key] = value
    if not pairs:
        raise ConfigError(f"{what} is empty; write it like {example}.")
    return pairs


def clean_patient_id(value: object) -> str:
    """Return a PatientID, or ``""`` for a missing or placeholder value.

    Args:
        value: raw PatientID.

    Returns:
        The stripped id, ``""`` when it identifies nobody (``ANONYMOUS``, ``0``, ...).
    """
    text = "" if value is None else str(value).strip()
    return "" if text.lower() in _PLACEHOLDER_IDS else text


def iter_files(folder: Path) -> Iterator[Path]:
    """Yield files under ``folder`` in a stable depth-first, sorted order.

    Hidden files and ``DICOMDIR`` are skipped; files of a folder come before its
    subfolders, so the first file is found without walking the whole tree.

    Args:
        folder: the folder.

    Yields:
        File paths.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    subdirs = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name.upper() == "DICOMDIR":
            continue
        if entry.is_dir():
            subdirs.append(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)
    for sub in subdirs:
        yield from iter_files(sub)


def read_study_header(path: Path) -> StudyHeader | None:
    """StudyInstanceUID and PatientID of the study in a folder or zip archive.

    Only headers of the first few files that could be DICOM are read, through
    :func:`ctscreen.dicom.identity.read_study_identity` (zips under the archive
    safety limits).

    Returns:
        The identifiers (a placeholder PatientID becomes ``""``), or ``None`` when
        no tried file had a StudyInstanceUID.

    Raises:
        DatasetError: a zip that is not a readable archive, breaks a safety
            bound, or holds no files.
    """
    try:
        identity = read_study_identity(path)
    except CtscreenError as exc:
        raise DatasetError(f"{path}: {exc.message}") from exc
    if identity is None:
        return None
    return StudyHeader(identity.study_uid, clean_patient_id(identity.patient_id), identity.file)
