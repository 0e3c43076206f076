"""The dashboard at /ui: static HTML, CSS and JavaScript shipped in the package (no build step, no CDN).

The page itself is public; it calls the API (/v1/route, /v1/chat/completions, /v1/stats, /v1/decisions,
/v1/feedback) with the key typed into it, kept in the browser's localStorage, so a client key sees only its own
traffic there and an admin key everyone's. Its responses forbid framing and any script, style or connection
from elsewhere (Content-Security-Policy, X-Frame-Options).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _Page(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_ui(app: FastAPI) -> None:
    @app.get("/ui", include_in_schema=False)
    async def _ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui/", _Page(directory=STATIC, html=True), name="ui")
