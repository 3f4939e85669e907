"""Adapters to the outside world. ``bridge.aio`` is the only place asyncio code runs."""

from bridge.aio import AsyncioThread, AsyncioThreadStatistics, open_asyncio_thread

__all__ = ["AsyncioThread", "AsyncioThreadStatistics", "open_asyncio_thread"]
