"""Prometheus metrics of one node: a registry of its own, scraped at ``GET /metrics``.

Each :class:`~hub.node.Node` owns one :class:`NodeMetrics` with its own
``CollectorRegistry`` (never prometheus_client's global one), so several nodes in one
process (tests, benchmarks) never collide.

Most numbers cost nothing on the hot path: :class:`~hub.metrics_collect.NodeCollector`
reads the components' own ``stats()``/``statistics()`` counters when Prometheus scrapes.
Only three things are observed as they happen:

* REST latency (:meth:`NodeMetrics.observe_request`, called once per request by the
  app), labelled by route *template* so raw paths cannot blow up the label set;
* event-loop lag (:meth:`NodeMetrics.run_loop_monitor`, a task under ``node.nursery``);
* fan-out duration (:meth:`NodeMetrics.observe_fanout`, a hook for the realtime core).

Every family is listed in :mod:`hub.metrics_catalog` (help texts and the docs table).
"""

from __future__ import annotations

import re
from collections import deque
from typing import TYPE_CHECKING

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

from hub.metrics_catalog import spec
from hub.metrics_collect import NodeCollector

if TYPE_CHECKING:
    from hub.node import Node

#: Seconds the loop-lag monitor sleeps between two measurements. A pause that starts
#: during the sleep shows only from the moment the sleep should have ended, so a pause
#: reads up to this much short: at 0.1 s an 80 ms pause measured on a node read as
#: 10 ms or nothing; at 0.02 s it reads 60 ms or more, for 50 cheap wake-ups a second.
LOOP_LAG_INTERVAL_S = 0.02
#: Histogram buckets (seconds).
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FANOUT_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Route label of a request that matched no route (404/405 on unknown paths).
UNMATCHED_ROUTE = "unmatched"
#: HTTP methods kept as label values; anything else is ``other``.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Seconds of samples :class:`RateWindow` keeps; rates are averaged over them.
RATE_WINDOW_S = 10.0
#: Samples closer together than this are merged (many pollers, one window).
RATE_MIN_SPACING_S = 0.25

_CONVERTER_RE = re.compile(r"<(?:\w+(?:\([^)]*\))?:)?(\w+)>")


def route_label(rule: str | None) -> str:
    """The route template of a URL rule (``/api/v1/webhooks/{id}``), or ``unmatched``."""
    if not rule:
        return UNMATCHED_ROUTE
    return _CONVERTER_RE.sub(r"{\1}", rule)


class RateWindow:
    """Per-second rates of monotonically growing counters, from samples taken on demand.

    :meth:`sample` records the counters' current values and returns their average rate
    over the last :data:`RATE_WINDOW_S` seconds. No background task: the window moves
    only when somebody asks (the admin page polls it).
    """

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, tuple[float, ...]]] = deque()

    def sample(self, now: float, values: tuple[float, ...]) -> tuple[float, ...]:
        """Record ``values`` at ``now``; return the rate of each (0 until two samples)."""
        samples = self._samples
        if samples and now - samples[-1][0] < RATE_MIN_SPACING_S and len(samples) > 1:
            samples.pop()
        samples.append((now, values))
        while len(samples) > 2 and now - samples[1][0] >= self._window_s:
            samples.popleft()
        first_at, first = samples[0]
        elapsed = now - first_at
        if elapsed <= 0:
            return tuple(0.0 for _ in values)
        return tuple(max(0.0, (v - f) / elapsed) for v, f in zip(values, first, strict=True))


class NodeMetrics:
    """The metrics of one node (see the module docstring).

    Args:
        node: the node whose components are read at scrape time; attributes that do
            not exist yet (a component not configured or not started) are skipped.
    """

    def __init__(self, node: Node) -> None:
        # No ``*_created`` series (process-wide switch; one process is one node): they
        # double the series count and Prometheus's text parser treats them as gauges.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        self.http_duration = _histogram(self.registry, "hub_http_request_duration_seconds")
        self.http_duration_buckets = HTTP_BUCKETS
        self.fanout_duration = _histogram(self.registry, "hub_fanout_duration_seconds")
        self.loop_lag = _histogram(self.registry, "hub_event_loop_lag_seconds")
        item = spec("hub_rate_limit_rejections_total")
        self.rate_limited = Counter(item.base_name, item.help, item.labels, registry=self.registry)
        self.registry.register(NodeCollector(node))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.rates = RateWindow()
        self.last_loop_lag_s = 0.0
        self.loop_lag_samples = 0
        self._loop_ticked = trio.Event()

    # -- observed as it happens --------------------------------------------------------
    def observe_request(self, method: str, rule: str | None, status: int, seconds: float) -> None:
        """Count one REST request (``rule`` is the matched URL rule, ``None`` if none)."""
        method = method if method in KNOWN_METHODS else "other"
        self.http_duration.labels(method, route_label(rule), str(status)).observe(seconds)

    def observe_rate_limited(self, group: str) -> None:
        """Count one request refused with 429 in rate-limit ``group``."""
        self.rate_limited.labels(group).inc()

    def observe_fanout(self, seconds: float) -> None:
        """Hook for the realtime core: one message handed to all local subscribers."""
        self.fanout_duration.observe(seconds)

    async def run_loop_monitor(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Measure how late the loop wakes a :data:`LOOP_LAG_INTERVAL_S` sleep, forever.

        Cancellation:
            Cancel the surrounding scope to stop (the node's nursery does).
        """
        task_status.started()
        while True:
            started = trio.current_time()
            await trio.sleep(LOOP_LAG_INTERVAL_S)
            lag = max(0.0, trio.current_time() - started - LOOP_LAG_INTERVAL_S)
            self.last_loop_lag_s = lag
            self.loop_lag.observe(lag)
            self.loop_lag_samples += 1
            self._loop_ticked.set()
            self._loop_ticked = trio.Event()

    async def wait_loop_lag_samples(self, count: int) -> None:
        """Return once the loop-lag monitor has taken ``count`` samples (tests)."""
        while self.loop_lag_samples < count:
            await self._loop_ticked.wait()

    # -- scraping ----------------------------------------------------------------------
    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the text format ``accept`` asks for (OpenMetrics or the
        classic Prometheus format) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


_BUCKETS = {
    "hub_http_request_duration_seconds": HTTP_BUCKETS,
    "hub_fanout_duration_seconds": FANOUT_BUCKETS,
    "hub_event_loop_lag_seconds": LOOP_LAG_BUCKETS,
}


def _histogram(registry: CollectorRegistry, name: str) -> Histogram:
    item = spec(name)
    return Histogram(name, item.help, item.labels, registry=registry, buckets=_BUCKETS[name])
