"""``GET/PUT/DELETE /api/v1/users/me`` and the admin listing ``GET /api/v1/users``."""

from __future__ import annotations

import logging
import math
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from quart import Blueprint, current_app

from api.auth.deps import require_claims
from api.envelope import success
from api.errors import unauthorized
from api.users.models import AdminUserOut, ListUsersQuery, UpdateMeIn, UserOut
from api.v1 import rate_group
from api.validation import endpoint
from storage.base import UserQuery

if TYPE_CHECKING:
    from quart import Response

    from api.app import HubApp
    from api.auth.tokens import AccessClaims
    from api.services import ApiServices
    from storage.base import User

log = logging.getLogger("hub.api.users")


def services() -> ApiServices:
    return cast("HubApp", current_app).node.services


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def user_body(user: User, *, with_role: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "user_id": str(user.id),
        "email": user.email,
        "full_name": user.full_name,
        "avatar_url": user.avatar_url,
        "is_verified": user.is_verified,
        "is_active": user.is_active,
        "created_at": iso(user.created_at),
        "updated_at": iso(user.updated_at),
    }
    if with_role:
        body["role"] = user.role.value
    return body


def _user_id(claims: AccessClaims) -> uuid.UUID:
    try:
        return uuid.UUID(claims.user_id)
    except ValueError:
        raise unauthorized("Invalid token") from None


def create_users_blueprint() -> Blueprint:
    bp = Blueprint("users", __name__, url_prefix="/users")

    @bp.get("/me")
    @rate_group("public")
    @endpoint(response=UserOut, auth="bearer", summary="The caller's account", tags=("users",))
    async def get_me() -> Response:
        claims = await require_claims()
        user = await services().users.get(_user_id(claims))
        if user is None:
            raise unauthorized("Account no longer exists")
        return success(user_body(user))

    @bp.put("/me")
    @rate_group("public")
    @endpoint(
        body=UpdateMeIn,
        response=UserOut,
        auth="bearer",
        summary="Change the caller's name or avatar",
        tags=("users",),
    )
    async def update_me(*, body: UpdateMeIn) -> Response:
        claims = await require_claims()
        svc = services()
        fields = body.model_fields_set
        clear_avatar = "avatar_url" in fields and body.avatar_url is None
        user = await svc.storage.update_user(
            _user_id(claims),
            full_name=body.full_name if "full_name" in fields else None,
            avatar_url=body.avatar_url if "avatar_url" in fields else None,
            clear_avatar=clear_avatar,
        )
        await svc.users.invalidate(claims.user_id)
        if user is None:
            raise unauthorized("Account no longer exists")
        return success(user_body(user), message="Profile updated")

    @bp.delete("/me")
    @rate_group("public")
    @endpoint(auth="bearer", summary="Delete the caller's account (soft delete)", tags=("users",))
    async def delete_me() -> Response:
        claims = await require_claims()
        svc = services()
        user_id = _user_id(claims)
        deleted = await svc.storage.soft_delete_user(user_id)
        revoked_at = time.time()
        svc.revocations.revoke_user(claims.user_id, revoked_at)
        # The other nodes now, not at their next storage poll (which stays the safety net).
        await cast("HubApp", current_app).node.realtime.announce_revocation(
            "user", claims.user_id, revoked_at
        )
        await svc.users.invalidate(claims.user_id)
        await svc.sessions.remove_user(claims.user_id)
        if not deleted:
            raise unauthorized("Account no longer exists")
        log.info("user deleted", extra={"deleted_user_id": claims.user_id})
        svc.events.emit(
            "user.deleted", {"user_id": claims.user_id, "deleted_at": iso(datetime.now(UTC))}
        )
        return success(None, message="Account deleted successfully")

    @bp.get("")
    @rate_group("admin")
    @endpoint(
        query=ListUsersQuery,
        response=AdminUserOut,
        response_list=True,
        auth="admin",
        summary="List users (admin): pages, filters, sort",
        tags=("users",),
    )
    async def list_users(*, query: ListUsersQuery) -> Response:
        await require_claims(admin=True)
        users, total = await services().storage.list_users(
            UserQuery(
                page=query.page,
                limit=query.limit,
                sort=query.sort,
                order=query.order,
                is_active=query.is_active,
                created_after=query.created_after,
                search=query.search or None,
            )
        )
        total_pages = math.ceil(total / query.limit) if total else 0
        return success(
            [user_body(user, with_role=True) for user in users],
            pagination={
                "page": query.page,
                "limit": query.limit,
                "total_items": total,
                "total_pages": total_pages,
                "has_next": query.page < total_pages,
                "has_prev": query.page > 1,
            },
        )

    return bp
