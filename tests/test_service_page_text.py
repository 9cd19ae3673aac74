"""Counts on the service page read as the language says them."""

from __future__ import annotations

import html

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
