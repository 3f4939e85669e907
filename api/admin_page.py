"""``GET /admin``: the admin page, plain HTML, CSS and JavaScript served by the hub.

No build step and nothing from a CDN: the three files under ``api/static/admin/`` are
read once when the app is built and served with a strict Content-Security-Policy. The
page itself is public (it is a login form); everything it shows comes from admin-only
REST routes (``/api/v1/admin/stats``, ``/api/v1/notifications``, ``/api/v1/webhooks``)
and from the WebSocket endpoint, with the access token the login returned.
"""

from __future__ import annotations

from importlib import resources

from quart import Blueprint, Response
from werkzeug.exceptions import NotFound

#: Files of the page and their content types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "admin.css": "text/css; charset=utf-8",
}
#: Scripts and styles only from the hub itself, no inline code, no framing; the API and
#: the WebSocket on the same origin ('self' covers ws:/wss: of the page's host).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def load_assets() -> dict[str, bytes]:
    """The page's files, read from the installed package."""
    folder = resources.files("api").joinpath("static", "admin")
    return {name: folder.joinpath(name).read_bytes() for name in ASSETS}


def create_admin_page_blueprint() -> Blueprint:
    """``/admin`` (and ``/admin/``) → the page; ``/admin/<file>`` → its script and style."""
    assets = load_assets()
    bp = Blueprint("admin_page", __name__)

    def serve(name: str) -> Response:
        return Response(assets[name], content_type=ASSETS[name], headers=SECURITY_HEADERS)

    @bp.get("/admin")
    @bp.get("/admin/")
    async def index() -> Response:
        return serve("index.html")

    @bp.get("/admin/<name>")
    async def asset(name: str) -> Response:
        if name not in assets or name == "index.html":
            raise NotFound()
        return serve(name)

    return bp
