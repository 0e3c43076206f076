"""The dashboard at /ui: static HTML, CSS and JavaScript shipped in the package (no build step, no CDN).

The page itself is public; it calls the API (/v1/route, /v1/chat/completions, /v1/stats, /v1/decisions,
/v1/feedback) with the key typed into it, kept in the browser's localStorage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_ui(app: FastAPI) -> None:
    @app.get("/ui", include_in_schema=False)
    async def _ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=STATIC, html=True), name="ui")
