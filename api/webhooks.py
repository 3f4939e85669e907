"""``/api/v1/webhooks``: admins register endpoints and read their delivery log (SPEC §2, §5).

* ``POST /webhooks`` ``{url, events, description?}`` → 201 with the signing ``secret``,
  shown this once (stored sealed with AES-256-GCM, never returned again);
* ``GET /webhooks``, ``GET /webhooks/{id}`` → the endpoints, without secrets;
* ``DELETE /webhooks/{id}`` → hard delete: the endpoint and its delivery log go;
* ``GET /webhooks/{id}/deliveries?page&limit&status`` → the log, newest first, paged
  like ``GET /users``.

The URL is checked at registration by the SSRF guard (:mod:`bridge.ssrf`): a refused
URL is a 400 with ``field: "url"``. Every route is admin-only, in the ``admin`` rate group.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from pydantic import AfterValidator, Field, field_validator
from quart import Blueprint, current_app

from api.auth.deps import require_claims
from api.envelope import success
from api.errors import not_found, validation_error
from api.v1 import rate_group
from api.validation import ApiModel, QueryModel, endpoint
from bridge.ssrf import MAX_URL_LENGTH, UrlRefused, check_webhook_url
from bridge.webhook_signing import new_secret
from storage.base import WILDCARD_EVENT, DeliveryStatus

if TYPE_CHECKING:
    from quart import Response

    from actors.webhook_dispatcher import WebhookDispatcher
    from api.app import HubApp
    from storage.base import Storage, Webhook, WebhookDelivery

#: Most event names one endpoint subscribes to.
MAX_EVENTS = 50
MAX_EVENT_LENGTH = 128
MAX_DESCRIPTION_LENGTH = 255
LIMIT_MAX = 100
PAGE_MAX = 1_000_000
_EVENT_RE = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_EVENT_LENGTH}}}")


def _check_event(name: str) -> str:
    if name != WILDCARD_EVENT and not _EVENT_RE.fullmatch(name):
        raise ValueError(
            f"an event is '*' or 1-{MAX_EVENT_LENGTH} characters of A-Z a-z 0-9 _ . : -"
        )
    return name


EventName = Annotated[str, AfterValidator(_check_event)]


class WebhookIn(ApiModel):
    """A new endpoint."""

    url: str = Field(
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL that receives the POSTs. Its host must resolve to public "
        "addresses only (unless WEBHOOK_ALLOW_PRIVATE=true).",
    )
    events: list[EventName] = Field(
        min_length=1,
        max_length=MAX_EVENTS,
        description="Event names to receive (`user.created`, `user.deleted`, any `event` a "
        "producer publishes); `*` receives every event.",
        examples=[["user.created", "payment.succeeded"]],
    )
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_LENGTH)

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class WebhookOut(ApiModel):
    id: str
    url: str
    events: list[str]
    description: str | None
    created_at: str
    updated_at: str


class WebhookCreatedOut(WebhookOut):
    secret: str = Field(
        description="Signing secret (`whsec_…`): shown only in this answer. "
        "`X-Webhook-Signature` is hex HMAC-SHA256(secret, raw body)."
    )


class DeliveryOut(ApiModel):
    id: str
    webhook_id: str
    event: str
    event_id: str = Field(description="The `id` of the event (body and `X-Webhook-Id`).")
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    last_status_code: int | None = Field(description="HTTP status of the last answer.")
    last_error: str | None = Field(description="Why the last attempt failed.")
    next_attempt_at: str | None = Field(description="When a pending delivery is tried next.")
    created_at: str
    updated_at: str


class DeliveriesQuery(QueryModel):
    page: int = Field(1, ge=1, le=PAGE_MAX)
    limit: int = Field(20, ge=1, le=LIMIT_MAX)
    status: Literal["pending", "succeeded", "failed"] | None = None


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhook_body(webhook: Webhook) -> dict[str, Any]:
    return {
        "id": str(webhook.id),
        "url": webhook.url,
        "events": list(webhook.events),
        "description": webhook.description,
        "created_at": _iso(webhook.created_at),
        "updated_at": _iso(webhook.updated_at),
    }


def delivery_body(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": str(delivery.id),
        "webhook_id": str(delivery.webhook_id),
        "event": delivery.event,
        "event_id": delivery.event_id,
        "status": delivery.status.value,
        "attempts": delivery.attempts,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "next_attempt_at": _iso(delivery.next_attempt_at),
        "created_at": _iso(delivery.created_at),
        "updated_at": _iso(delivery.updated_at),
    }


def _storage() -> Storage:
    return cast("HubApp", current_app).node.storage


def _dispatcher() -> WebhookDispatcher:
    return cast("HubApp", current_app).node.webhooks


async def _find(webhook_id: str) -> Webhook:
    """The endpoint with this id (any text that is not a UUID is simply not found)."""
    try:
        key = uuid.UUID(webhook_id)
    except ValueError:
        raise not_found("Webhook not found") from None
    webhook = await _storage().get_webhook(key)
    if webhook is None:
        raise not_found("Webhook not found")
    return webhook


def create_webhooks_blueprint() -> Blueprint:
    bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")

    @bp.post("")
    @rate_group("admin")
    @endpoint(
        body=WebhookIn,
        response=WebhookCreatedOut,
        status=201,
        auth="admin",
        summary="Register a webhook endpoint (the secret is shown once)",
        description="Events the endpoint subscribes to are POSTed to `url` as "
        '`{"id","event","timestamp","data"}` with `X-Webhook-Signature` = hex '
        "HMAC-SHA256(secret, raw body). Non-2xx or timeout: up to 5 attempts.",
        tags=("webhooks",),
    )
    async def create_webhook(*, body: WebhookIn) -> Response:
        await require_claims(admin=True)
        dispatcher = _dispatcher()
        try:
            await check_webhook_url(body.url, allow_private=dispatcher.allow_private)
        except UrlRefused as error:
            raise validation_error(f"url: {error.reason}", field="url") from None
        webhook_id = uuid.uuid4()
        secret = new_secret()
        webhook = await _storage().create_webhook(
            webhook_id=webhook_id,
            url=body.url,
            events=body.events,
            description=body.description,
            secret_ciphertext=dispatcher.secretbox.seal(secret, associated=webhook_id.bytes),
        )
        dispatcher.subscriptions_changed()
        return success(
            {**webhook_body(webhook), "secret": secret},
            status=201,
            message="Webhook created; store the secret now, it is not shown again",
        )

    @bp.get("")
    @rate_group("admin")
    @endpoint(
        response=WebhookOut,
        response_list=True,
        auth="admin",
        summary="List webhook endpoints",
        tags=("webhooks",),
    )
    async def list_webhooks() -> Response:
        await require_claims(admin=True)
        webhooks = await _storage().list_webhooks()
        return success([webhook_body(w) for w in webhooks])

    @bp.get("/<webhook_id>")
    @rate_group("admin")
    @endpoint(
        response=WebhookOut,
        auth="admin",
        errors=(404,),
        summary="One webhook endpoint",
        tags=("webhooks",),
    )
    async def get_webhook(webhook_id: str) -> Response:
        await require_claims(admin=True)
        return success(webhook_body(await _find(webhook_id)))

    @bp.delete("/<webhook_id>")
    @rate_group("admin")
    @endpoint(
        auth="admin",
        errors=(404,),
        summary="Delete a webhook endpoint and its delivery log",
        tags=("webhooks",),
    )
    async def delete_webhook(webhook_id: str) -> Response:
        await require_claims(admin=True)
        webhook = await _find(webhook_id)
        if not await _storage().delete_webhook(webhook.id):
            raise not_found("Webhook not found")
        _dispatcher().subscriptions_changed()
        return success(None, message="Webhook deleted")

    @bp.get("/<webhook_id>/deliveries")
    @rate_group("admin")
    @endpoint(
        query=DeliveriesQuery,
        response=DeliveryOut,
        response_list=True,
        auth="admin",
        errors=(404,),
        summary="The delivery log of a webhook endpoint (newest first)",
        tags=("webhooks",),
    )
    async def list_deliveries(webhook_id: str, *, query: DeliveriesQuery) -> Response:
        await require_claims(admin=True)
        webhook = await _find(webhook_id)
        deliveries, total = await _storage().list_webhook_deliveries(
            webhook.id,
            page=query.page,
            limit=query.limit,
            status=DeliveryStatus(query.status) if query.status else None,
        )
        total_pages = math.ceil(total / query.limit) if total else 0
        return success(
            [delivery_body(d) for d in deliveries],
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
