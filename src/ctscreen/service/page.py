"""The service's web page: server-rendered HTML in English and Russian.

The page is one HTML document; :func:`jobs_fragment` renders its jobs table and
:func:`dicom_panel` the DICOM node's outbox, which ``static/app.js`` fetches again
every two seconds (the same idea as htmx's ``hx-get``/``hx-trigger="every 2s"``,
in plain JavaScript, so there is no build step and no third-party script). Every
value from a job, the node or a client is escaped.
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Mapping, Sequence
from typing import Any

from ..html_report import format_probability
from ..report import ResultRow
from ..results import FAILURE
from .store import Job

LANGUAGES: tuple[str, ...] = ("en", "ru")

TEXT: dict[str, dict[str, str]] = {
    "title": {"en": "ctscreen: chest CT screening", "ru": "ctscreen: скрининг КТ грудной клетки"},
    "note": {
        "en": "Research tool, not for clinical use.",
        "ru": "Исследовательский инструмент, не для клинического применения.",
    },
    "drop": {
        "en": "Drop zip archives or DICOM files here, or choose them",
        "ru": "Перетащите сюда zip-архивы или файлы DICOM или выберите их",
    },
    "choose": {"en": "Choose files", "ru": "Выбрать файлы"},
    "upload": {"en": "Upload and score", "ru": "Загрузить и оценить"},
    "per_slice": {"en": "one row per slice", "ru": "строка на каждый срез"},
    "uploading": {"en": "Uploading…", "ru": "Загрузка…"},
    "jobs": {"en": "Jobs", "ru": "Задания"},
    "no_jobs": {"en": "No jobs yet.", "ru": "Заданий пока нет."},
    "created": {"en": "Created", "ru": "Создано"},
    "files": {"en": "Files", "ru": "Файлы"},
    "status": {"en": "Status", "ru": "Статус"},
    "progress": {"en": "Progress", "ru": "Ход"},
    "results": {"en": "Results", "ru": "Результаты"},
    "download": {"en": "Download", "ru": "Скачать"},
    "report": {"en": "report", "ru": "отчёт"},
    "delete": {"en": "Delete", "ru": "Удалить"},
    "study": {"en": "Study", "ru": "Исследование"},
    "patient_id": {"en": "Patient ID", "ru": "ID пациента"},
    "accession": {"en": "Accession No.", "ru": "Номер заявки (Accession)"},
    "study_date": {"en": "Study date", "ru": "Дата исследования"},
    "study_uid": {"en": "Study Instance UID", "ru": "UID исследования"},
    "probability": {"en": "Probability", "ru": "Вероятность"},
    "decision": {"en": "Decision", "ru": "Заключение"},
    "reason": {"en": "Failure reason", "ru": "Причина сбоя"},
    "row_warnings": {"en": "Warnings", "ru": "Предупреждения"},
    "model_warnings": {
        "en": "The model's card warns:",
        "ru": "Карточка модели предупреждает:",
    },
    "pathology": {"en": "pathology", "ru": "патология"},
    "no_pathology": {"en": "no pathology", "ru": "без патологии"},
    "failure": {"en": "failure", "ru": "ошибка"},
    "queued": {"en": "queued", "ru": "в очереди"},
    "running": {"en": "running", "ru": "выполняется"},
    "done": {"en": "done", "ru": "готово"},
    "failed": {"en": "failed", "ru": "сбой"},
    "timeout": {"en": "timed out", "ru": "превышено время"},
    "viewer_note": {
        "en": "You are signed in as a viewer: you see the results; uploading needs an "
        "operator's token.",
        "ru": "Вы вошли как наблюдатель: результаты видны, для загрузки нужен токен оператора.",
    },
    "expired": {
        "en": "results removed: kept for the period this server keeps them",
        "ru": "результаты удалены: истёк срок их хранения на этом сервере",
    },
    "all_results": {"en": "All results", "ru": "Все результаты"},
    "token": {"en": "Access token", "ru": "Токен доступа"},
    "sign_in": {"en": "Sign in", "ru": "Войти"},
    "token_needed": {
        "en": "This server needs its access token (ask the administrator who started it).",
        "ru": "Для этого сервера нужен токен доступа (спросите администратора).",
    },
    "wrong_token": {"en": "Wrong token.", "ru": "Неверный токен."},
    "api": {"en": "API documentation", "ru": "Документация API"},
    "threshold": {"en": "threshold", "ru": "порог"},
    "more_rows": {"en": "{n} more rows in the downloads", "ru": "ещё строк в файлах: {n}"},
    "dicom": {"en": "DICOM node", "ru": "DICOM-узел"},
    "dicom_to": {
        "en": "AE {ae} on port {port}; results go to {destination}.",
        "ru": "AE {ae} на порту {port}; результаты отправляются в {destination}.",
    },
    "dicom_kept": {
        "en": "AE {ae} on port {port}; results go back to the AE that sent the study.",
        "ru": "AE {ae} на порту {port}; результаты возвращаются AE, приславшему исследование.",
    },
    "dicom_failed": {
        "en": "Not answered in full: {study}: {reason}",
        "ru": "Ответ неполный: {study}: {reason}",
    },
    "oldest": {"en": "the oldest for {age}", "ru": "самый давний — {age}"},
    "last_error": {"en": "last error: {error}", "ru": "последняя ошибка: {error}"},
    "send_now": {"en": "Send now", "ru": "Отправить сейчас"},
    "nothing_waiting": {"en": "nothing waiting to be sent", "ru": "к отправке ничего нет"},
    "under_a_minute": {"en": "under a minute", "ru": "меньше минуты"},
    "minutes": {"en": "{n} min", "ru": "{n} мин"},
    "hours": {"en": "{h} h {m} min", "ru": "{h} ч {m} мин"},
}


def pick_language(query: str | None, cookie: str | None, accept_language: str | None) -> str:
    """``?lang=``, then the ``lang`` cookie, then the browser's Accept-Language; English last."""
    for choice in (query, cookie):
        if choice in LANGUAGES:
            return str(choice)
    for part in (accept_language or "").split(","):
        code = part.split(";")[0].strip().lower()[:2]
        if code in LANGUAGES:
            return code
    return "en"


def t(key: str, lang: str, **values: object) -> str:
    """The label ``key`` in ``lang`` (English when missing), formatted with ``values``."""
    entry = TEXT[key]
    return entry.get(lang, entry["en"]).format(**values)


#: Word forms by count: English (one, other); Russian (one, few, many), as after a number.
_COUNTED: dict[str, dict[str, tuple[str, ...]]] = {
    # "из N ..." takes the genitive: из 1 файла, из 2 файлов, из 5 файлов
    "of_files": {
        "en": ("of {n} file", "of {n} files"),
        "ru": ("из {n} файла",) + ("из {n} файлов",) * 2,
    },
    "studies": {
        "en": ("{n} study", "{n} studies"),
        "ru": ("{n} исследование", "{n} исследования", "{n} исследований"),
    },
    "waiting": {
        "en": ("{n} result waiting to be sent", "{n} results waiting to be sent"),
        "ru": (
            "{n} результат ждёт отправки",
            "{n} результата ждут отправки",
            "{n} результатов ждут отправки",
        ),
    },
    "sent": {"en": ("{n} sent",) * 2, "ru": ("отправлено: {n}",) * 3},
    "unanswered": {
        "en": ("{n} study not answered yet", "{n} studies not answered yet"),
        "ru": (
            "{n} исследование ещё без ответа",
            "{n} исследования ещё без ответа",
            "{n} исследований ещё без ответа",
        ),
    },
    "not_screened": {
        "en": ("{n} not screened", "{n} not screened"),
        "ru": ("не оценено: {n}",) * 3,
    },
    "refused": {
        "en": ("{n} instance refused", "{n} instances refused"),
        "ru": ("отклонено объектов: {n}",) * 3,
    },
    "arriving": {
        "en": ("{n} study arriving", "{n} studies arriving"),
        "ru": (
            "принимается {n} исследование",
            "принимаются {n} исследования",
            "принимается {n} исследований",
        ),
    },
}


def plural_form(n: int, lang: str) -> int:
    """Index of the word form for ``n`` in ``lang``: English 0 (one) / 1 (other);
    Russian 0 (1, 21, 101 ...), 1 (2-4, 22-24 ...), 2 (0, 5-20, 25-30, 111 ...)."""
    if lang != "ru":
        return 0 if n == 1 else 1
    tens, last = n % 100, n % 10
    if last == 1 and tens != 11:
        return 0
    if 2 <= last <= 4 and not 12 <= tens <= 14:
        return 1
    return 2


def counted(key: str, n: int, lang: str) -> str:
    """``n`` with the word ``key`` in the form its count needs (``1 study``, ``5 исследований``)."""
    forms = _COUNTED[key].get(lang) or _COUNTED[key]["en"]
    return forms[plural_form(n, lang if lang in _COUNTED[key] else "en")].format(n=n)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def format_time(unix: float | None) -> str:
    """A Unix time as ISO 8601 in the server's time zone, with its offset
    (``2026-12-03 18:40:05+03:00``); "" for None."""
    if unix is None:
        return ""
    return _dt.datetime.fromtimestamp(unix).astimezone().isoformat(sep=" ", timespec="seconds")


def format_threshold(value: object) -> str:
    """The decision threshold with 3 decimals (``0.856``); other values as they are."""
    try:
        return f"{float(value):.3f}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)


def format_study_date(value: str) -> str:
    """A DICOM date ``YYYYMMDD`` as ``YYYY-MM-DD`` (anything else as it is)."""
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def short_uid(uid: str, keep: int = 8) -> str:
    """A long UID shortened for the eye to its first and last ``keep`` characters
    (``1.2.826.…498.1001``); the page gives the full one in a ``title``."""
    if len(uid) <= 2 * keep + 1:
        return uid
    return f"{uid[:keep]}…{uid[-keep:]}"


def model_warnings(run_info: Mapping[str, object]) -> tuple[str, ...]:
    """The model card's warnings in the run info (``model_warnings``, joined by "; ")."""
    text = str(run_info.get("model_warnings") or "")
    return tuple(w.strip() for w in text.split("; ") if w.strip())


def _decision(row: ResultRow, lang: str) -> str:
    if row.processing_status == FAILURE:
        return f'<span class="badge failure">{_e(t("failure", lang))}</span>'
    if row.pathology == 1:
        return f'<span class="badge pathology">{_e(t("pathology", lang))}</span>'
    return f'<span class="badge normal">{_e(t("no_pathology", lang))}</span>'


#: The result table's columns: (label key, cell class), in page order.
RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("study", "study"),
    ("patient_id", "patient-id"),
    ("accession", "accession"),
    ("study_date", "study-date"),
    ("study_uid", "study-uid"),
    ("probability", "probability"),
    ("decision", "decision"),
    ("reason", "reason"),
    ("row_warnings", "warnings"),
)


def _warnings_list(warnings: Sequence[str]) -> str:
    if not warnings:
        return ""
    return '<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>"


def _result_row(
    row: ResultRow, threshold: float | None, lang: str, shown_above: Sequence[str] = ()
) -> str:
    probability = (
        ""
        if row.probability_of_pathology is None
        else _e(format_probability(row.probability_of_pathology, threshold))
    )
    reason = f'<span class="error">{_e(row.error)}</span>' if row.error else ""
    uid = (
        f'<span title="{_e(row.study_uid)}">{_e(short_uid(row.study_uid))}</span>'
        if row.study_uid
        else ""
    )
    cells = {
        "study": _e(row.path_to_study),
        "patient-id": _e(row.patient_id),
        "accession": _e(row.accession_number),
        "study-date": _e(format_study_date(row.study_date)),
        "study-uid": uid,
        "probability": probability,
        "decision": _decision(row, lang),
        "reason": reason,
        "warnings": _warnings_list([w for w in row.warnings if w not in shown_above]),
    }
    mono = {"study", "patient-id", "accession", "study-uid"}
    return (
        '<tr class="result">'
        + "".join(
            f'<td class="{"mono " if name in mono else ""}'
            f'{"num " if name == "probability" else ""}{name}">{cells[name]}</td>'
            for _, name in RESULT_COLUMNS
        )
        + "</tr>"
    )


def _result_rows(
    rows: Sequence[ResultRow],
    threshold: float | None,
    lang: str,
    limit: int,
    shown_above: Sequence[str] = (),
) -> str:
    if not rows:
        return ""
    lines = [_result_row(row, threshold, lang, shown_above) for row in rows[:limit]]
    more = ""
    if len(rows) > limit:
        more = f'<p class="muted">{_e(t("more_rows", lang, n=len(rows) - limit))}</p>'
    head = "".join(f"<th>{_e(t(key, lang))}</th>" for key, _ in RESULT_COLUMNS)
    return (
        f'<table class="results"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(lines)}</tbody></table>{more}"
    )


def _downloads(job: Job, lang: str) -> str:
    base = f"/api/v1/jobs/{job.id}"
    links = " ".join(
        f'<a href="{base}/result.{fmt}" download>{fmt}</a>' for fmt in ("xlsx", "csv", "json")
    )
    return (
        f"{_e(t('download', lang))}: {links} "
        f'<a href="{base}/report" target="_blank" rel="noopener">{_e(t("report", lang))}</a>'
    )


def jobs_fragment(
    jobs: Sequence[Job],
    rows: Mapping[str, Sequence[ResultRow]],
    *,
    threshold: float | None,
    lang: str,
    rows_per_job: int = 20,
    can_delete: bool = True,
    model_cautions: Sequence[str] = (),
) -> str:
    """The ``<tbody>`` of the jobs table (what the page fetches every two seconds); delete
    buttons only when ``can_delete`` (an admin). A row's warnings leave out the model
    card's (``model_cautions``), which the page shows once above the table."""
    if not jobs:
        return f'<tr><td colspan="5" class="muted">{_e(t("no_jobs", lang))}</td></tr>'
    out = []
    for job in jobs:
        names = ", ".join(f.name for f in job.inputs)
        progress = (
            f"{job.inputs_done} {_e(counted('of_files', len(job.inputs), lang))}, "
            f"{_e(counted('studies', job.rows_done, lang))}"
        )
        message = f'<div class="error">{_e(job.message)}</div>' if job.message else ""
        if job.expired is not None:
            message += f'<div class="muted">{_e(t("expired", lang))}</div>'
        actions = _downloads(job, lang) if job.final and job.expired is None else ""
        delete = (
            f'<button type="button" class="delete" data-job="{_e(job.id)}">'
            f"{_e(t('delete', lang))}</button>"
            if job.status != "running" and can_delete
            else ""
        )
        results = _result_rows(rows.get(job.id, ()), threshold, lang, rows_per_job, model_cautions)
        out.append(
            f'<tr class="job" id="job-{_e(job.id)}" data-status="{_e(job.status)}">'
            f'<td class="nowrap"><time datetime="{_e(format_time(job.created))}">'
            f"{_e(format_time(job.created))}</time></td>"
            f'<td class="mono">{_e(names)}</td>'
            f'<td><span class="status {_e(job.status)}">{_e(t(job.status, lang))}</span></td>'
            f"<td>{progress}</td>"
            f"<td>{results}{message}"
            f'<div class="actions">{actions} {delete}</div></td></tr>'
        )
    return "".join(out)


def _age(seconds: float, lang: str) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return t("under_a_minute", lang)
    if minutes < 60:
        return t("minutes", lang, n=minutes)
    return t("hours", lang, h=minutes // 60, m=minutes % 60)


def dicom_panel(status: Mapping[str, Any], lang: str) -> str:
    """The DICOM node's part of the page (what ``static/app.js`` fetches from ``/ui/dicom``
    every two seconds): where results go, studies arriving, the outbox, and a button
    that sends what waits now.

    Args:
        status: :meth:`ctscreen.service.dicom_node.DicomNode.status`.
        lang: the page's language.
    """
    where = {"ae": status["ae_title"], "port": status["port"]}
    if status["send_to"]:
        line = t("dicom_to", lang, destination=", ".join(status["send_to"]), **where)
    else:
        line = t("dicom_kept", lang, **where)
    outbox = status["outbox"]
    studies = status.get("studies", {})
    parts = []
    if status["incoming"]:
        parts.append(_e(counted("arriving", len(status["incoming"]), lang)))
    if studies.get("unanswered"):
        parts.append(
            f'<span class="status failed">{_e(counted("unanswered", studies["unanswered"], lang))}'
            "</span>"
        )
    if studies.get("not_screened"):
        parts.append(_e(counted("not_screened", studies["not_screened"], lang)))
    refused = sum(status.get("refused", {}).get("by_reason", {}).values())
    if refused:
        parts.append(_e(counted("refused", refused, lang)))
    if outbox["pending"]:
        waiting = _e(counted("waiting", outbox["pending"], lang))
        notes = [t("oldest", lang, age=_age(outbox["oldest_pending_seconds"] or 0, lang))]
        pending = (i for i in status["items"] if i["state"] == "pending")
        error = next((i["last_error"] for i in pending if i["last_error"]), "")
        if error:
            notes.append(t("last_error", lang, error=error))
        parts.append(f'<span class="status failed">{waiting}</span> ({_e("; ".join(notes))})')
    else:
        parts.append(_e(t("nothing_waiting", lang)))
    parts.append(_e(counted("sent", outbox["sent"], lang)))
    addressed = (
        status["send_to"]
        or status.get("peers")
        or any(i.get("destination") for i in status["items"] if i["state"] == "pending")
    )
    button = (
        f' <button type="button" class="retry">{_e(t("send_now", lang))}</button>'
        if outbox["pending"] and addressed
        else ""
    )
    failed = [
        f"<li>{_e(t('dicom_failed', lang, study=s['study_uid'], reason=s['reason']))}</li>"
        for s in status.get("recent_studies", [])
        if s.get("failed") and s.get("reason")
    ]
    return (
        f'<h2>{_e(t("dicom", lang))}</h2><p class="muted">{_e(line)}</p>'
        f'<p class="outbox">{" · ".join(parts)}{button}</p>'
        + (f'<ul class="failures">{"".join(failed[:10])}</ul>' if failed else "")
    )


def _head(lang: str) -> str:
    return (
        f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(t('title', lang))}</title>"
        '<link rel="stylesheet" href="/static/app.css"></head>'
    )


def _language_links(lang: str) -> str:
    return " ".join(
        f'<a href="/?lang={code}"{" class=current" if code == lang else ""}>{code.upper()}</a>'
        for code in LANGUAGES
    )


def request_language(request: Any) -> str:
    """The page language a request asks for: ``?lang=``, then the cookie, then its
    Accept-Language header."""
    return pick_language(
        request.query_params.get("lang"),
        request.cookies.get("lang"),
        request.headers.get("accept-language"),
    )


def main_page(
    body_rows: str,
    *,
    lang: str,
    run_info: Mapping[str, object],
    dicom: str | None = None,
    can_upload: bool = True,
) -> str:
    """The whole page: upload form (a note instead without ``can_upload``: a viewer), the
    DICOM node (``dicom`` from :func:`dicom_panel`, None when it is off), jobs table
    (``body_rows`` from :func:`jobs_fragment`); the model card's warnings
    (``run_info["model_warnings"]``) under the research-tool note."""
    model = _e(
        f"ctscreen {run_info.get('ctscreen_version', '')} · {run_info.get('device', '')} · "
        f"{t('threshold', lang)} {format_threshold(run_info.get('threshold', ''))}"
    )
    cautions = model_warnings(run_info)
    card = (
        f'<div class="model-warnings"><p>{_e(t("model_warnings", lang))}</p>'
        f"{_warnings_list(cautions)}</div>"
        if cautions
        else ""
    )
    form = (
        '<form id="upload" class="drop" enctype="multipart/form-data">'
        f"<p>{_e(t('drop', lang))}</p>"
        f'<label class="button">{_e(t("choose", lang))}'
        '<input id="files" type="file" name="files" multiple hidden></label> '
        f'<label><input type="checkbox" name="mode" value="slice"> {_e(t("per_slice", lang))}'
        f'</label> <button type="submit">{_e(t("upload", lang))}</button>'
        f'<p id="upload-status" class="muted" data-uploading="{_e(t("uploading", lang))}"></p>'
        "</form>"
        if can_upload
        else f'<p class="muted viewer">{_e(t("viewer_note", lang))}</p>'
    )
    return (
        f'{_head(lang)}<body data-lang="{lang}"><main>'
        f"<header><h1>{_e(t('title', lang))}</h1><nav>{_language_links(lang)} · "
        f'<a href="/docs">{_e(t("api", lang))}</a></nav></header>'
        f'<p class="note">{_e(t("note", lang))}</p>{card}<p class="muted">{model}</p>'
        + form
        + ("" if dicom is None else f'<section id="dicom">{dicom}</section>')
        + f"<h2>{_e(t('jobs', lang))}</h2>"
        f'<p>{_e(t("all_results", lang))}: <a href="/api/v1/results.xlsx" download>xlsx</a> '
        '<a href="/api/v1/results.csv" download>csv</a> '
        '<a href="/api/v1/results.json" download>json</a></p>'
        f'<table class="jobs"><thead><tr><th>{_e(t("created", lang))}</th>'
        f"<th>{_e(t('files', lang))}</th><th>{_e(t('status', lang))}</th>"
        f"<th>{_e(t('progress', lang))}</th><th>{_e(t('results', lang))}</th></tr></thead>"
        f'<tbody id="jobs">{body_rows}</tbody></table>'
        '</main><script src="/static/app.js"></script></body></html>'
    )


def login_page(*, lang: str, wrong: bool = False) -> str:
    """The token form shown to a browser without a valid session."""
    error = f'<p class="error">{_e(t("wrong_token", lang))}</p>' if wrong else ""
    return (
        f"{_head(lang)}<body><main><header><h1>{_e(t('title', lang))}</h1>"
        f"<nav>{_language_links(lang)}</nav></header>"
        f"<p>{_e(t('token_needed', lang))}</p>{error}"
        f'<form method="post" action="/ui/login?lang={lang}" class="login">'
        f'<label>{_e(t("token", lang))} <input type="password" name="token" '
        'autocomplete="current-password" required></label> '
        f'<button type="submit">{_e(t("sign_in", lang))}</button></form></main></body></html>'
    )
