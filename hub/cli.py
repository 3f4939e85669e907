"""The ``hub`` command: ``serve``, ``migrate`` and ``users create`` (SPEC §1).

A bad setting prints one line on stderr and exits 2. SIGINT and SIGTERM stop ``serve``
gracefully (WebSockets closed with 1001, in-flight requests finished) and exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from hub.settings import Settings, describe_error, load_settings

EXIT_BAD_SETTING = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub", description="notification-hub node")
    parser.add_argument("--config", help="YAML settings file (env wins over it)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a node (HTTP API and WebSocket)")
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    serve.add_argument("--config", dest="config_sub", help="YAML settings file")

    migrate = commands.add_parser("migrate", help="apply storage migrations")
    migrate.add_argument("--config", dest="config_sub", help="YAML settings file")

    users = commands.add_parser("users", help="manage users")
    users_cmd = users.add_subparsers(dest="users_command", required=True)
    create = users_cmd.add_parser("create", help="create a user and print its id")
    create.add_argument("email")
    create.add_argument("--password", required=True)
    create.add_argument("--full-name", required=True)
    create.add_argument("--admin", action="store_true", help="give the user the admin role")
    create.add_argument("--verified", action="store_true", help="mark the e-mail verified")
    create.add_argument("--config", dest="config_sub", help="YAML settings file")
    return parser


def _fail(message: str) -> int:
    print(f"hub: {message}", file=sys.stderr)
    return EXIT_BAD_SETTING


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_file = getattr(args, "config_sub", None) or args.config
    overrides: dict[str, Any] = {}
    if args.command == "serve":
        if args.host is not None:
            overrides["host"] = args.host
        if args.port is not None:
            overrides["port"] = args.port
    try:
        settings = load_settings(config_file, **overrides)
    except Exception as error:  # pydantic.ValidationError, OSError, YAML errors
        return _fail(describe_error(error))

    from hub.logs import configure_logging

    configure_logging(settings.log_level, settings.hub_node_id, settings.log_format)
    from storage.base import StorageUnavailable

    commands = {"serve": _serve, "migrate": _migrate, "users": _create_user}
    unavailable: StorageUnavailable | None = None
    try:
        return trio.run(commands[args.command], settings, args)
    except* StorageUnavailable as group:
        unavailable = group.exceptions[0]  # type: ignore[assignment]
    print(f"hub: storage unavailable: {unavailable}", file=sys.stderr)
    return EXIT_UNAVAILABLE


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import logging

    from hub.node import freeze_startup_heap, open_node, serve_node

    log = logging.getLogger("hub")
    shutdown = trio.Event()

    async def watch_signals(
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                shutdown.set()
                return

    async with open_node(settings) as node, trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        bound = await nursery.start(
            lambda task_status: serve_node(
                node,
                host=settings.host,
                port=settings.port,
                shutdown=shutdown,
                task_status=task_status,
            )
        )
        freeze_startup_heap()
        for host, port in bound:
            log.info(
                "serving on http://%s:%s",
                host if ":" not in host else f"[{host}]",
                port,
                extra={
                    "storage": node.storage.backend,
                    "broker": "redis" if settings.redis_url else "memory",
                },
            )
        await shutdown.wait()
    log.info("stopped")
    return 0


async def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from contextlib import AsyncExitStack

    from storage import open_storage

    async with AsyncExitStack() as stack:
        aio = None
        if settings.uses_postgres:
            from bridge.aio import open_asyncio_thread

            aio = await stack.enter_async_context(open_asyncio_thread(name="hub-aio"))
        storage = await stack.enter_async_context(open_storage(settings, aio))
        applied = await storage.migrate()
    print("applied: " + (", ".join(applied) if applied else "nothing, up to date"))
    return 0


async def _create_user(settings: Settings, args: argparse.Namespace) -> int:
    from contextlib import AsyncExitStack

    from api.auth.passwords import PasswordPolicyError, check_password_policy, hash_password
    from storage import Conflict, Role, open_storage

    try:
        check_password_policy(args.password)
    except PasswordPolicyError as error:
        return _fail(f"--password: {error}")
    password_hash = await trio.to_thread.run_sync(
        hash_password, args.password, settings.bcrypt_rounds
    )
    async with AsyncExitStack() as stack:
        aio = None
        if settings.uses_postgres:
            from bridge.aio import open_asyncio_thread

            aio = await stack.enter_async_context(open_asyncio_thread(name="hub-aio"))
        storage = await stack.enter_async_context(open_storage(settings, aio))
        await storage.migrate()
        try:
            user = await storage.create_user(
                email=args.email.strip(),
                password_hash=password_hash,
                full_name=args.full_name,
                role=Role.ADMIN if args.admin else Role.USER,
                is_verified=args.verified,
            )
        except Conflict:
            return _fail(f"a user with e-mail {args.email!r} already exists")
    print(user.id)
    return 0
