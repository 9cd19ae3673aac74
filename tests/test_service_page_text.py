"""Counts on the service page read as the language says them."""

from __future__ import annotations

import html
import re

import pytest

from ctscreen.service.page import counted, dicom_panel


@pytest.mark.parametrize(
    ("n", "studies", "of_files"),
    [
        (1, "1 исследование", "из 1 файла"),
        (3, "3 исследования", "из 3 файлов"),
        (5, "5 исследований", "из 5 файлов"),
        (11, "11 исследований", "из 11 файлов"),
        (14, "14 исследований", "из 14 файлов"),
        (21, "21 исследование", "из 21 файла"),
        (24, "24 исследования", "из 24 файлов"),
        (0, "0 исследований", "из 0 файлов"),
    ],
)
def test_russian_counts_take_the_form_their_number_needs(
    n: int, studies: str, of_files: str
) -> None:
    assert counted("studies", n, "ru") == studies
    assert counted("of_files", n, "ru") == of_files


def test_english_counts_are_singular_only_for_one() -> None:
    assert counted("studies", 1, "en") == "1 study"
    assert counted("studies", 2, "en") == "2 studies"
    assert counted("of_files", 1, "en") == "of 1 file"
    assert counted("of_files", 0, "en") == "of 0 files"


def _node_status(pending: int, *, error: str = "", send_to: str | None = "PACS@10.0.0.5:104"):
    items = [
        {"state": "pending", "last_error": error if k == 0 else "", "file": f"r{k}.dcm"}
        for k in range(pending)
    ] + [{"state": "sent", "last_error": "", "file": "s.dcm"}]
    return {
        "ae_title": "CTSCREEN",
        "port": 11112,
        "send_to": [send_to] if send_to else [],
        "peers": [],
        "incoming": [{"study_uid": "1.2.3"}] * 2,
        "outbox": {
            "pending": pending,
            "sent": 14,
            "gone": 0,
            "oldest_pending_seconds": 750.0 if pending else None,
        },
        "items": items,
    }


def test_dicom_panel_shows_what_waits_why_and_a_send_button() -> None:
    error = "association rejected <by> the PACS"
    en = dicom_panel(_node_status(3, error=error), "en")
    assert "AE CTSCREEN on port 11112; results go to PACS@10.0.0.5:104." in en
    assert "2 studies arriving" in en and "14 sent" in en
    assert "3 results waiting to be sent</span> (the oldest for 12 min; last error: " in en
    assert html.escape(error) in en and error not in en  # escaped
    assert '<button type="button" class="retry">Send now</button>' in en
    ru = dicom_panel(_node_status(1, error=error), "ru")
    assert "1 результат ждёт отправки" in ru and "самый давний — 12 мин" in ru
    assert "принимаются 2 исследования" in ru and "Отправить сейчас" in ru


def test_dicom_panel_without_pending_results_or_destination_has_no_button() -> None:
    idle = dicom_panel(_node_status(0), "en")
    assert "nothing waiting to be sent" in idle and "button" not in idle
    fresh = _node_status(1)
    fresh["outbox"]["oldest_pending_seconds"] = 20.0
    assert "(the oldest for under a minute)" in dicom_panel(fresh, "en")
    fresh["outbox"]["oldest_pending_seconds"] = 2 * 3600 + 5 * 60
    assert "(самый давний — 2 ч 5 мин)" in dicom_panel(fresh, "ru")
    kept = dicom_panel(_node_status(2, send_to=None), "en")
    assert "results go back to the AE that sent the study" in kept
    assert "2 results waiting to be sent" in kept and "button" not in kept


def test_dicom_panel_names_unanswered_and_not_screened_studies_with_their_reason() -> None:
    status = _node_status(0)
    status["studies"] = {"unanswered": 2, "not_screened": 1}
    status["recent_studies"] = [
        {"study_uid": "1.2.9", "failed": 1, "reason": "not a chest CT: <head>"},
        {"study_uid": "1.2.8", "failed": 0, "reason": ""},
    ]
    status["refused"] = {"by_reason": {"not CT image storage": 3}, "items": []}
    en = dicom_panel(status, "en")
    assert '<span class="status failed">2 studies not answered yet</span>' in en
    assert "1 not screened" in en and "3 instances refused" in en
    assert "Not answered in full: 1.2.9: not a chest CT: &lt;head&gt;" in en
    assert "1.2.8" not in en
    ru = dicom_panel(status, "ru")
    assert "2 исследования ещё без ответа" in ru and "Ответ неполный: 1.2.9" in ru


def _job(job_id: str, status: str, message: str = ""):
    from ctscreen.service.store import InputFile, Job

    return Job(
        id=job_id,
        status=status,
        mode="study",
        created=1_764_000_000.0,
        started=1_764_000_001.0,
        finished=1_764_000_009.0,
        message=message,
        inputs=(InputFile(0, "norma<1>.zip", "0000.upload", 10),),
        inputs_done=1,
        rows_done=2,
        failures=1,
        attempts=1,
    )


HOSTILE = '<img src=x onerror="alert(1)">'


def _rows() -> list:
    from ctscreen.report import ResultRow

    return [
        ResultRow(
            path_to_study="norma.zip/study1",
            study_uid="1.2.826.0.1.3680043.8.498.10011234",
            series_uid="1.2.826.0.1.3680043.8.498.10011234.2",
            probability_of_pathology=0.912345,
            pathology=1,
            processing_status="Success",
            time_of_processing=1.5,
            warnings=("borderline & not firm", "gantry tilt 12°"),
            patient_id=HOSTILE,
            accession_number="ACC-77",
            study_date="20240131",
        ),
        ResultRow(
            path_to_study="broken.zip/study",
            study_uid="1.2.3.9",
            processing_status="Failure",
            time_of_processing=0.2,
            error="TOO_FEW_SLICES: 3 slices <16",
            patient_id="PT-9",
        ),
    ]


def test_result_rows_show_identifiers_reason_and_warnings_escaped() -> None:
    from ctscreen.service.page import jobs_fragment

    en = jobs_fragment(
        [_job("j1", "done")], {"j1": _rows()}, threshold=0.8562770623434605, lang="en"
    )
    for label in ("Patient ID", "Accession No.", "Study date", "Study Instance UID"):
        assert f"<th>{label}</th>" in en
    assert "<th>Failure reason</th>" in en and "<th>Warnings</th>" in en
    assert HOSTILE not in en and html.escape(HOSTILE, quote=True) in en
    assert "norma&lt;1&gt;.zip" in en and "norma<1>" not in en
    assert '<td class="mono accession">ACC-77</td>' in en
    assert '<td class="study-date">2024-01-31</td>' in en
    # The UID is shortened for the eye, whole in the title.
    assert '<span title="1.2.826.0.1.3680043.8.498.10011234">1.2.826.…10011234</span>' in en
    assert '<td class="mono study-uid"><span title="1.2.3.9">1.2.3.9</span></td>' in en
    # A failure's reason has its own column; its probability cell stays empty.
    assert '<td class="num probability"></td>' in en
    assert (
        '<td class="reason"><span class="error">TOO_FEW_SLICES: 3 slices &lt;16</span></td>' in en
    )
    assert '<td class="num probability">0.912</td>' in en
    assert "<li>borderline &amp; not firm</li><li>gantry tilt 12°</li>" in en
    # Times carry their zone offset (ISO 8601).
    assert re.search(r'<time datetime="2025-11-2\d \d\d:\d\d:\d\d[+-]\d\d:\d\d">', en)
    ru = jobs_fragment([_job("j1", "done")], {"j1": _rows()}, threshold=0.5, lang="ru")
    for label in ("ID пациента", "Дата исследования", "UID исследования", "Причина сбоя"):
        assert f"<th>{label}</th>" in ru
    assert "Предупреждения" in ru and "ошибка" in ru
    # The model card's warnings are shown once above the table, not on every row.
    quiet = jobs_fragment(
        [_job("j1", "done")],
        {"j1": _rows()},
        threshold=0.5,
        lang="en",
        model_cautions=("gantry tilt 12°",),
    )
    assert "<li>borderline &amp; not firm</li></ul>" in quiet and "gantry" not in quiet


def test_page_formats_the_threshold_and_shows_the_model_cards_warnings() -> None:
    from ctscreen.service.page import main_page

    run_info = {
        "ctscreen_version": "0.1.0",
        "device": "cpu",
        "threshold": 0.8562770623434605,
        "model_warnings": "this model was trained on synthetic studies only <demo>; "
        "this model takes a 16x32x32 input",
    }
    en = main_page("", lang="en", run_info=run_info)
    assert "threshold 0.856" in en and "0.8562770623434605" not in en
    assert "The model&#x27;s card warns:" in en
    assert "<li>this model was trained on synthetic studies only &lt;demo&gt;</li>" in en
    assert "<li>this model takes a 16x32x32 input</li>" in en
    ru = main_page("", lang="ru", run_info=run_info)
    assert "Карточка модели предупреждает:" in ru and "порог 0.856" in ru
    quiet = main_page("", lang="en", run_info=run_info | {"model_warnings": ""})
    assert "model-warnings" not in quiet


def test_format_time_threshold_and_uid() -> None:
    from ctscreen.service.page import format_threshold, format_time, short_uid

    assert format_threshold(0.8562770623434605) == "0.856" and format_threshold(0.5) == "0.500"
    assert format_threshold("") == "" and format_time(None) == ""
    stamp = format_time(0.0)
    assert re.fullmatch(r"19(69|70)-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d", stamp)
    assert short_uid("1.2.3") == "1.2.3" and len(short_uid("1." * 30)) == 17
