"""The search page, the API docs page and their files, all served from here: nothing is
fetched from a CDN. No ``from __future__ import annotations``: FastAPI reads these
signatures' types."""

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from mmembed.serve.http.errors import ApiError
from mmembed.serve.http.service import mounted

SWAGGER_UI = Path(fastapi_offline.__file__).parent / "static"
PAGE = Path(__file__).resolve().parents[2] / "ui"
UI_FILES = {p.name: p for p in PAGE.iterdir() if p.is_file()} | {
    name: SWAGGER_UI / name for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
}  # the pages' files: nothing else

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page(request: Request) -> HTMLResponse:
    """The search page; its links are relative to where the app is mounted."""
    return HTMLResponse(UI_FILES["index.html"].read_text().replace("{{BASE}}", mounted(request, "/")))


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI from /ui/; no validator badge, which would be fetched from validator.swagger.io."""
    base = mounted(request, "/")
    return get_swagger_ui_html(
        openapi_url=f"{base}openapi.json",
        title="mmembed API",
        swagger_js_url=f"{base}ui/swagger-ui-bundle.js",
        swagger_css_url=f"{base}ui/swagger-ui.css",
        swagger_favicon_url=f"{base}ui/favicon.png",
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/ui/{name}")
async def page_file(name: str) -> FileResponse:
    if name not in UI_FILES:
        raise ApiError(404, "not_found", f"no file {name!r}")
    return FileResponse(UI_FILES[name])
