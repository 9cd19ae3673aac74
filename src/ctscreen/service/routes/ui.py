"""The web page: the whole page, its jobs table fragment, and the token login."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from .. import page
from ..audit import LOGIN
from ..context import Context, ServiceContext
from ..roles import ADMIN, OPERATOR, PUBLIC, SESSION_COOKIE, VIEWER, TokenTable, require

router = APIRouter()


def _jobs(ctx: ServiceContext, lang: str) -> str:
    jobs = ctx.store.list_jobs(limit=50)
    rows = {job.id: ctx.store.rows(job.id) for job in jobs if job.rows_done}
    admin = ctx.principal is not None and ctx.principal.may(ADMIN)
    return page.jobs_fragment(
        jobs,
        rows,
        threshold=ctx.threshold(),
        lang=lang,
        can_delete=admin,
        model_cautions=page.model_warnings(ctx.run_info()),
    )


def _dicom(ctx: ServiceContext, lang: str) -> str | None:
    return None if ctx.node is None else page.dicom_panel(ctx.node.status(limit=20), lang)


@router.get("/", include_in_schema=False, dependencies=[Depends(require(PUBLIC))])
def index(request: Request, ctx: Context) -> HTMLResponse:
    lang = page.request_language(request)
    if ctx.principal is None:
        response = HTMLResponse(page.login_page(lang=lang), status_code=401)
    else:
        response = HTMLResponse(
            page.main_page(
                _jobs(ctx, lang),
                lang=lang,
                run_info=ctx.run_info(),
                dicom=_dicom(ctx, lang),
                can_upload=ctx.principal.may(OPERATOR),
            )
        )
    if request.query_params.get("lang") in page.LANGUAGES:
        response.set_cookie("lang", lang, samesite="strict", max_age=365 * 86400)
    return response


@router.get("/ui/jobs", include_in_schema=False, dependencies=[Depends(require(VIEWER))])
def jobs_fragment(request: Request, ctx: Context) -> HTMLResponse:
    return HTMLResponse(_jobs(ctx, page.request_language(request)))


@router.post("/ui/login", include_in_schema=False, dependencies=[Depends(require(PUBLIC))])
async def login(request: Request, ctx: Context) -> Response:
    lang = page.request_language(request)
    tokens: TokenTable = request.app.state.tokens
    form = await request.form(max_files=0, max_fields=2, max_part_size=4096)
    who = tokens.principal(request) if tokens.open else tokens.identify(str(form.get("token", "")))
    if who is None:
        return HTMLResponse(page.login_page(lang=lang, wrong=True), status_code=401)
    response: Response = Response(status_code=303, headers={"Location": f"/?lang={lang}"})
    if not tokens.open:
        response.set_cookie(
            SESSION_COOKIE,
            tokens.session(who),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        ctx.audit.record(LOGIN, actor=who.name, role=who.role, address=ctx.address)
    return response
