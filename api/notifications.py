"""``POST /api/v1/notifications``: an admin publishes to one or more channels (SPEC §2).

The route is a thin shell over :meth:`actors.realtime.Realtime.publish`, the same path a
RabbitMQ message takes: validate, publish, answer 202 with the message id and its offset
on each channel. When the broker (Redis, in a cluster) is unreachable: 503 with
``Retry-After: 1``; the publisher retries with the same ``id``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, cast

from pydantic import AfterValidator, Field, model_validator
from quart import Blueprint, current_app

from actors.protocol import MAX_CHANNEL_LENGTH, is_known_channel
from actors.realtime import PublishError
from api.auth.deps import require_claims
from api.envelope import success
from api.errors import service_unavailable, validation_error
from api.v1 import rate_group
from api.validation import ApiModel, endpoint
from bridge.broker import BrokerUnavailable

if TYPE_CHECKING:
    from quart import Response

    from api.app import HubApp

#: Most channels one publish may name.
MAX_PUBLISH_CHANNELS = 100
#: ``Retry-After`` (s) of the 503 answered while the broker is unreachable.
BROKER_RETRY_AFTER_S = 1
#: Longest ``event`` name and message ``id``.
MAX_EVENT_LENGTH = 128
MAX_ID_LENGTH = 128


def _check_channel(name: str) -> str:
    if not is_known_channel(name):
        raise ValueError(
            f"must be global, admin, or public.<name>, user.<id> or admin.<name>, at most "
            f"{MAX_CHANNEL_LENGTH} characters of A-Z a-z 0-9 _ . : -"
        )
    return name


ChannelName = Annotated[str, AfterValidator(_check_channel)]


class PublishIn(ApiModel):
    """A notification to publish: ``channel`` or ``channels`` (exactly one of them)."""

    channel: ChannelName | None = Field(None, description="One channel.", examples=["global"])
    channels: list[ChannelName] | None = Field(
        None, min_length=1, max_length=MAX_PUBLISH_CHANNELS, description="Several channels."
    )
    data: dict[str, Any] = Field(
        description="The notification. `id` and `timestamp` are filled in when missing; "
        "`title` and `body` are what clients usually show.",
        examples=[{"title": "Hello", "body": "Welcome aboard"}],
    )
    event: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_EVENT_LENGTH,
        description="Event name, sent with the notification and to webhooks.",
    )
    id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID_LENGTH,
        description="Message id; publishing the same id again within 10 minutes delivers it once.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> PublishIn:
        if (self.channel is None) == (self.channels is None):
            raise ValueError("give exactly one of `channel` and `channels`")
        return self


class PublishOut(ApiModel):
    id: str = Field(description="The message id (also `data.id` unless the data had one).")
    offsets: dict[str, str] = Field(
        description="Each channel's offset of this message (what clients pass as `since`)."
    )


def create_notifications_blueprint() -> Blueprint:
    bp = Blueprint("notifications", __name__, url_prefix="/notifications")

    @bp.post("")
    @rate_group("admin")
    @endpoint(
        body=PublishIn,
        response=PublishOut,
        status=202,
        auth="admin",
        errors=(503,),
        summary="Publish a notification to channels",
        description="Delivered to every WebSocket subscriber of each channel and kept in "
        "each channel's history (for `since`). 503 while the broker (Redis) is unreachable: "
        "retry with the same `id`.",
        tags=("notifications",),
    )
    async def publish(*, body: PublishIn) -> Response:
        await require_claims(admin=True)
        realtime = cast("HubApp", current_app).node.realtime
        channels = body.channels if body.channels is not None else [cast(str, body.channel)]
        try:
            result = await realtime.publish(channels, body.data, event=body.event, id=body.id)
        except PublishError as error:
            raise validation_error(error.message, field=error.field) from None
        except BrokerUnavailable:
            raise service_unavailable(
                "The message broker is unavailable, retry shortly with the same id",
                retry_after_s=BROKER_RETRY_AFTER_S,
            ) from None
        return success({"id": result.id, "offsets": result.offsets}, status=202)

    return bp
