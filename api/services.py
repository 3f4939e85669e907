"""The account services of a node, built once at start and shared by every request.

``open_api_services(node)`` builds :class:`ApiServices` from ``node.settings``: the token
service, the revocation list (warmed from storage and kept in step with other nodes),
the bcrypt hasher, the rate limiter (Redis when ``REDIS_URL`` is set, else memory), the
e-mail queue (RabbitMQ ``email_queue`` when ``AMQP_URL`` is set, else durable files in
``HUB_DATA_DIR/email_queue``) and its worker, the user cache and the session mirror.
The realtime core uses :meth:`ApiServices.authenticate` and
:attr:`ApiServices.revocations`; webhooks subscribe to :attr:`ApiServices.events`.

Resource handling:
    Background tasks (the e-mail worker, the revocation sync) run under
    ``node.nursery`` and stop with it; the Redis client is closed when the block is left.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import trio

from actors.email_worker import EmailWorker
from api.auth.passwords import PasswordHasher
from api.auth.revocations import RevocationList
from api.auth.session_records import SessionRecords
from api.auth.tokens import AccessClaims, TokenError, TokenService
from api.events import HubEvents
from api.ratelimit import MemoryRateLimiter, RateLimiter
from api.user_cache import UserCache
from bridge.email_queue import EmailJob, EmailQueue
from bridge.email_queue_local import open_local_email_queue
from bridge.mailer import Mailer, OutboxMailer, SmtpMailer
from hub.supervisor import supervise

if TYPE_CHECKING:
    from bridge.redis_kv import RedisKV
    from hub.node import Node
    from hub.settings import Settings
    from storage.base import Storage

log = logging.getLogger("hub.api.services")

#: Prefix of every Redis key this node's account services write, when the node itself
#: does not say (``node.redis_prefix``). Tests set it to isolate themselves on a shared
#: Redis; production leaves it empty.
REDIS_KEY_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar(
    "hub_redis_key_prefix", default=""
)


@dataclass
class ApiServices:
    """Everything the REST API (and the WebSocket's auth) needs besides storage."""

    settings: Settings
    storage: Storage
    tokens: TokenService
    revocations: RevocationList
    passwords: PasswordHasher
    rate_limiter: RateLimiter
    email: EmailQueue
    email_worker: EmailWorker
    users: UserCache
    sessions: SessionRecords
    events: HubEvents
    kv: RedisKV | None = None

    def authenticate(self, token: str) -> AccessClaims:
        """Decode an access token and check it is not revoked. Synchronous, no I/O.

        Raises:
            TokenError: missing, malformed, expired, wrong type, or revoked
                (reason ``"revoked"``).
        """
        claims = self.tokens.decode_access(token)
        if self.revocations.is_revoked(claims):
            raise TokenError("revoked")
        return claims

    async def send_email(
        self, *, to: str, subject: str, template: str, variables: dict[str, str]
    ) -> EmailJob:
        """Queue an e-mail for the worker; returns the job."""
        job = EmailJob.new(to=to, subject=subject, template=template, variables=variables)
        await self.email.put(job)
        return job


def make_mailer(settings: Settings) -> Mailer:
    """SMTP when ``SMTP_HOST`` is set, else the outbox in ``HUB_DATA_DIR/outbox``."""
    if settings.smtp_host:
        return SmtpMailer(
            settings.smtp_host,
            settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password,
            starttls=settings.smtp_starttls,
        )
    return OutboxMailer(settings.hub_data_dir / "outbox")


@asynccontextmanager
async def open_api_services(node: Node, *, redis_prefix: str = "") -> AsyncIterator[ApiServices]:
    """Build the services of ``node`` and start their background tasks.

    Args:
        node: the node being opened (``settings``, ``storage`` and ``nursery`` are set).
        redis_prefix: prepended to every Redis key (tests isolate themselves with it);
            else ``node.redis_prefix`` when the node has one, else
            :data:`REDIS_KEY_PREFIX`.
    """
    settings = node.settings
    prefix = redis_prefix or getattr(node, "redis_prefix", "") or REDIS_KEY_PREFIX.get()
    async with AsyncExitStack() as stack:
        kv: RedisKV | None = None
        rate_limiter: RateLimiter
        if settings.redis_url:
            from api.ratelimit_redis import RedisRateLimiter
            from bridge.redis_kv import RedisKV

            kv = RedisKV(settings.redis_url, prefix=prefix)
            stack.push_async_callback(kv.aclose)
            rate_limiter = RedisRateLimiter(kv)
            node.ready_checks.setdefault("redis", kv.ping)
        else:
            rate_limiter = MemoryRateLimiter()

        revocations = RevocationList(settings.access_token_ttl_s)
        warmed = await revocations.warm(node.storage)
        if warmed:
            log.info("revocation list warmed with %d sessions", warmed)

        queue: EmailQueue
        if settings.amqp_url:  # SPEC §4: queue ``email_queue`` on RabbitMQ
            from bridge.email_queue_amqp import open_amqp_email_queue

            amqp_queue = await stack.enter_async_context(
                open_amqp_email_queue(
                    settings.amqp_url,
                    node_id=settings.hub_node_id,
                    reconnect_max_s=settings.amqp_reconnect_max_s,
                )
            )
            # /ready names RabbitMQ while the e-mail link is down (the ingest, when the
            # node runs it, registers its own link under the same name).
            node.ready_checks.setdefault("rabbitmq", amqp_queue.check_ready)
            queue = amqp_queue
        else:  # the same worker on an in-process durable queue
            queue = await stack.enter_async_context(
                open_local_email_queue(settings.hub_data_dir / "email_queue")
            )
        worker = EmailWorker(queue, make_mailer(settings), sender=settings.email_from)
        services = ApiServices(
            settings=settings,
            storage=node.storage,
            tokens=TokenService(
                settings.resolved_jwt_secret(),
                settings.access_token_ttl_s,
                settings.refresh_token_ttl_s,
            ),
            revocations=revocations,
            passwords=await trio.to_thread.run_sync(PasswordHasher, settings.bcrypt_rounds),
            rate_limiter=rate_limiter,
            email=queue,
            email_worker=worker,
            users=UserCache(node.storage, kv),
            sessions=SessionRecords(kv),
            events=HubEvents(),
            kv=kv,
        )
        await node.nursery.start(supervise, "email-worker", worker.run)
        await node.nursery.start(
            supervise, "revocation-sync", partial(revocations.run_sync, node.storage)
        )
        yield services
