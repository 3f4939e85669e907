"""Registers every blueprint of the REST API on the app.

Children of ``/api/v1`` go on ``v1`` (they then get rate limits and headers, see
:mod:`api.v1`); ``/openapi.json``, ``/docs`` and the admin page ``/admin`` sit at the root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.admin import create_admin_blueprint
from api.admin_page import create_admin_page_blueprint
from api.auth.routes import create_auth_blueprint
from api.notifications import create_notifications_blueprint
from api.openapi import create_docs_blueprint
from api.users.routes import create_users_blueprint
from api.v1 import create_v1_blueprint
from api.webhooks import create_webhooks_blueprint

if TYPE_CHECKING:
    from quart import Blueprint

    from api.app import HubApp


def v1_children() -> list[Blueprint]:
    """The blueprints mounted under ``/api/v1``."""
    children = [create_auth_blueprint(), create_users_blueprint()]
    children.append(create_notifications_blueprint())  # POST /notifications (realtime)
    children.append(create_admin_blueprint())  # GET /admin/stats (operations)
    children.append(create_webhooks_blueprint())  # /webhooks (admin, SPEC §5)
    return children


def register_routes(app: HubApp) -> None:
    """Attach the ``/api/v1`` blueprints and the API docs."""
    v1 = create_v1_blueprint()
    for child in v1_children():
        v1.register_blueprint(child)
    app.register_blueprint(v1)
    app.register_blueprint(create_docs_blueprint())
    app.register_blueprint(create_admin_page_blueprint())  # GET /admin: the admin page
