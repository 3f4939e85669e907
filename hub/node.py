"""One node: one process, one trio loop, every service of the hub under one nursery tree.

Nesting follows hypercorn's own (outermost first): the asyncio bridge (only when an
asyncio-only driver is configured), storage, the account services (tokens, revocations,
rate limits, e-mail worker), the realtime core, then the front door serving HTTP and
WebSocket. Shutdown unwinds in the reverse order.

Resource handling:
    ``open_node`` owns every service it starts; leaving the ``async with`` block cancels
    and closes them. ``serve_node`` owns the listening sockets and the connections.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import trio

from hub.descriptors import DescriptorBudget, open_files_limit
from hub.metrics import NodeMetrics
from hub.settings import Settings
from hub.supervisor import supervise

if TYPE_CHECKING:
    from actors.ingest import IngestActor
    from actors.realtime import Realtime
    from actors.webhook_dispatcher import WebhookDispatcher
    from api.services import ApiServices
    from bridge.aio import AsyncioThread
    from storage.base import Storage

log = logging.getLogger("hub.node")

READY_CHECK_TIMEOUT_S = 2.0
STORAGE_WAIT_S = 60.0

ReadyCheck = Callable[[], Awaitable[None]]


class Node:
    """Handles on every running service of this node. Built by :func:`open_node`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node_id = settings.hub_node_id
        self.aio: AsyncioThread | None = None
        self.storage: Storage
        self.services: ApiServices
        self.realtime: Realtime
        self.webhooks: WebhookDispatcher
        self.ingest: IngestActor | None = None
        self.nursery: trio.Nursery
        self.ready_checks: dict[str, ReadyCheck] = {}
        self.bound: list[tuple[str, int]] = []
        self.redis_prefix = ""
        #: Open file descriptors against RLIMIT_NOFILE: the front door counts its sockets
        #: in it, the realtime core admits WebSocket upgrades against it.
        self.descriptors = DescriptorBudget(open_files_limit(), settings.fd_reserve)
        self.metrics = NodeMetrics(self)

    async def check_ready(self) -> dict[str, bool]:
        """Run every readiness check concurrently; a check that raises or takes longer
        than :data:`READY_CHECK_TIMEOUT_S` counts as down."""
        results: dict[str, bool] = {}

        async def run_one(name: str, check: ReadyCheck) -> None:
            ok = False
            with trio.move_on_after(READY_CHECK_TIMEOUT_S):
                try:
                    await check()
                    ok = True
                except Exception as error:
                    log.warning("readiness check %s failed: %s", name, error)
            results[name] = ok

        async with trio.open_nursery() as nursery:
            for name, check in self.ready_checks.items():
                nursery.start_soon(run_one, name, check)
        return results


@asynccontextmanager
async def open_node(
    settings: Settings, *, storage_schema: str | None = None, redis_prefix: str = ""
) -> AsyncIterator[Node]:
    """Start every service of a node except the listener, and yield the node.

    Args:
        settings: the node's settings.
        storage_schema: PostgreSQL schema to use (tests isolate themselves with it).
        redis_prefix: prepended to every Redis key of this node (tests isolate with it).
    """
    from actors.ingest import open_ingest
    from actors.realtime import open_realtime
    from actors.webhook_dispatcher import open_webhooks
    from api.services import open_api_services
    from storage import open_storage

    node = Node(settings)
    node.redis_prefix = redis_prefix
    async with trio.open_nursery() as root:
        # Background tasks live in their own nursery so that they can be cancelled
        # first, and the services below then close without a pending cancellation
        # (which would turn every awaited close into Cancelled and hide real errors).
        node.nursery = await root.start(_host_tasks)
        try:
            async with AsyncExitStack() as stack:
                await node.nursery.start(
                    supervise, "loop-lag-monitor", node.metrics.run_loop_monitor
                )
                if settings.uses_postgres:
                    from bridge.aio import open_asyncio_thread

                    node.aio = await stack.enter_async_context(open_asyncio_thread(name="hub-aio"))
                node.storage = await stack.enter_async_context(
                    open_storage(settings, node.aio, schema=storage_schema)
                )
                applied = await _migrate(node.storage)
                if applied:
                    log.info("applied migrations %s", ", ".join(applied))
                node.ready_checks["storage"] = node.storage.ping
                node.services = await stack.enter_async_context(open_api_services(node))
                node.realtime = await stack.enter_async_context(open_realtime(node))
                node.webhooks = await stack.enter_async_context(open_webhooks(node))
                # Last: a RabbitMQ message may arrive at once and needs all of the above.
                node.ingest = await stack.enter_async_context(open_ingest(node))
                try:
                    yield node
                finally:
                    node.nursery.cancel_scope.cancel()
        finally:
            root.cancel_scope.cancel()


async def _host_tasks(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    """Own the node's background tasks until cancelled."""
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


async def _migrate(storage: Storage) -> list[str]:
    """Apply migrations, waiting for the database while it is unreachable at start
    (containers often start before their database), up to :data:`STORAGE_WAIT_S`."""
    from storage.base import StorageUnavailable

    deadline = trio.current_time() + STORAGE_WAIT_S
    delay = 0.5
    while True:
        try:
            return await storage.migrate()
        except StorageUnavailable as error:
            if trio.current_time() + delay > deadline:
                raise
            log.warning("storage unavailable at start (%s); retrying in %.1fs", error, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)


def freeze_startup_heap() -> None:
    """Take everything alive once the node has started (modules, the app, settings,
    pools) out of the garbage collector's reach, so that a full collection walks only
    what the node creates while serving.

    Measured under RabbitMQ ingest load: full collections stalled the loop for 130–290
    ms every 4–15 s (the p99 of every workload); with the start-up heap frozen a full
    collection took 1.5 ms. Frozen objects are never freed, which is what start-up
    objects are anyway. Process-wide, so ``hub serve`` calls it once the node listens
    (tests that start many nodes in one process do not).
    """
    gc.collect()
    gc.freeze()


async def serve_node(
    node: Node,
    *,
    host: str,
    port: int,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP and WebSocket on ``host:port`` until ``shutdown`` is set, then drain.

    Reports the bound addresses through ``task_status`` (port 0 picks a free port).
    """
    from api.app import MAX_BODY_BYTES, create_app
    from hub.frontdoor import FrontDoor, hypercorn_config

    app = create_app(node)
    config = hypercorn_config(
        graceful_timeout_s=node.settings.shutdown_timeout_s, max_body_bytes=MAX_BODY_BYTES
    )
    door = FrontDoor(app, config, node.realtime.handle_websocket, descriptors=node.descriptors)
    node.realtime.admission.descriptors = node.descriptors

    async def drain() -> None:
        # Stop taking RabbitMQ messages first (in-flight ones finish and are acked),
        # then close the WebSockets.
        if node.ingest is not None:
            await node.ingest.stop()
        await node.realtime.drain()

    await door.serve(
        host,
        port,
        shutdown=shutdown,
        before_http_drain=drain,
        task_status=task_status,
    )
