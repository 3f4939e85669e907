"""The scrape-time collector: turns the components' own counters into metric families.

Nothing here runs on the fan-out path. At each scrape :class:`NodeCollector` calls, on
the node's trio thread (the app's ``/metrics`` view), the synchronous statistics of

* ``node.realtime.stats()`` (hub counters, close codes, the broker's counters);
* ``node.ingest.statistics()`` (RabbitMQ ingest, once the node runs it) and the ingest
  link's ``statistics()`` when the actor exposes ``link``;
* ``node.services.email_worker.statistics()`` and the e-mail queue's ``link``;
* ``node.webhooks.statistics()`` (the webhook dispatcher, once the node runs it);
* :class:`hub.supervisor.SupervisorStats`;
* ``node.realtime.admission.statistics()`` and ``node.descriptors.statistics()``
  (refused upgrades, failed accepts, shed connections).

A component that is absent (not configured, not built yet) is skipped; one whose
statistics raise is logged and skipped, so a scrape never fails because of one part.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, is_dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from hub import __version__
from hub.metrics_catalog import spec

if TYPE_CHECKING:
    from hub.node import Node

log = logging.getLogger("hub.metrics")

#: Reason label of a close code missing from the close-code table.
_FALLBACK_REASONS = {1005: "no status", 1006: "connection lost", 4011: "insufficient state"}


def _counter(name: str) -> CounterMetricFamily:
    item = spec(name)
    return CounterMetricFamily(item.base_name, item.help, labels=item.labels)


def _gauge(name: str) -> GaugeMetricFamily:
    item = spec(name)
    return GaugeMetricFamily(item.name, item.help, labels=item.labels)


def _as_mapping(value: Any) -> Mapping[str, Any]:
    """A statistics object as a mapping (dicts as they are, dataclasses as dicts)."""
    if isinstance(value, Mapping):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return {}


def _read(component: Any, *methods: str) -> Mapping[str, Any] | None:
    """The first of ``methods`` that ``component`` has, called, as a mapping; ``None``
    when the component or the methods are absent or the call fails."""
    if component is None:
        return None
    for method in methods:
        fn: Callable[[], Any] | None = getattr(component, method, None)
        if fn is None:
            continue
        try:
            return _as_mapping(fn())
        except Exception:
            log.exception("reading %s.%s() for /metrics failed", type(component).__name__, method)
            return None
    return None


def _close_reason(code: int) -> str:
    from actors.close_codes import CLOSE_INFO, CloseCode

    try:
        return CLOSE_INFO[CloseCode(code)].reason
    except (ValueError, KeyError):
        return _FALLBACK_REASONS.get(code, "other")


def _number(stats: Mapping[str, Any], key: str) -> float | None:
    value = stats.get(key)
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else None


class NodeCollector:
    """A prometheus_client collector reading one node's components (module docstring)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on which components run."""
        return []

    def collect(self) -> Iterator[Metric]:
        node = self._node
        info = _gauge("hub_node_info")
        info.add_metric([node.node_id, __version__], 1)
        yield info
        yield from self._realtime(getattr(node, "realtime", None))
        yield from self._ingest(getattr(node, "ingest", None))
        services = getattr(node, "services", None)
        yield from self._email(services)
        yield from self._amqp_links(services)
        yield from self._webhooks(getattr(node, "webhooks", None))
        yield from self._descriptors(node)
        yield from self._restarts()

    # -- realtime ----------------------------------------------------------------------
    def _realtime(self, realtime: Any) -> Iterator[Metric]:
        stats = _read(realtime, "stats", "statistics")
        if stats is None:
            return
        connections = _gauge("hub_websocket_connections")
        connections.add_metric([self._node.node_id], _number(stats, "connections") or 0)
        yield connections
        yield from _simple(stats, "connections_opened", "hub_websocket_connections_opened_total")
        yield from _simple(stats, "handshake_failures", "hub_websocket_handshake_failures_total")
        yield from _simple(stats, "channels", "hub_channels_active")
        yield from _simple(stats, "publications", "hub_messages_fanout_total")
        yield from _simple(stats, "delivered", "hub_messages_delivered_total")
        yield from _simple(stats, "fanout_writes", "hub_fanout_writes_total")

        disconnects = _counter("hub_websocket_disconnects_total")
        for code, count in sorted(_as_mapping(stats.get("closed")).items()):
            disconnects.add_metric([str(code), _close_reason(int(code))], count)
        yield disconnects

        subscriptions = _number(stats, "subscriptions")
        if subscriptions is None:
            subscriptions = float(sum(channel_subscribers(realtime).values()))
        gauge = _gauge("hub_subscriptions")
        gauge.add_metric([], subscriptions)
        yield gauge

        broker = _as_mapping(stats.get("broker"))
        yield from _simple(broker, "published", "hub_messages_published_total")
        dropped = _counter("hub_messages_dropped_total")
        if "duplicates" in broker:
            dropped.add_metric(["duplicate"], broker["duplicates"])
        for reason, count in sorted(_as_mapping(stats.get("dropped")).items()):
            dropped.add_metric([str(reason)], count)
        yield dropped
        yield from _simple(broker, "publish_failures", "hub_broker_publish_failures_total")
        yield from _simple(broker, "redis_connected", "hub_redis_connected")
        yield from _simple(broker, "redis_reconnects", "hub_redis_reconnects_total")

    # -- RabbitMQ, e-mail, webhooks ------------------------------------------------------
    def _ingest(self, ingest: Any) -> Iterator[Metric]:
        stats = _read(ingest, "statistics", "stats")
        if stats is None:
            return
        yield from _simple(stats, "received", "hub_amqp_messages_consumed_total")
        yield from _simple(stats, "redelivered", "hub_amqp_messages_redelivered_total")
        yield from _simple(stats, "dead_lettered", "hub_amqp_messages_dead_lettered_total")
        yield from _simple(stats, "duplicates", "hub_amqp_messages_duplicate_total")
        yield from _simple(stats, "publish_retries", "hub_amqp_publish_retries_total")
        counts = stats.get("delay_counts")
        if counts:
            from actors.ingest import DELAY_BUCKETS

            item = spec("hub_amqp_ingest_delay_seconds")
            bounds = [*(repr(float(b)) for b in DELAY_BUCKETS), "+Inf"]
            delay = HistogramMetricFamily(item.name, item.help)
            delay.add_metric(
                [],
                list(zip(bounds, accumulate(counts), strict=True)),
                sum_value=_number(stats, "delay_sum_s") or 0.0,
            )
            yield delay

    def _email(self, services: Any) -> Iterator[Metric]:
        stats = _read(getattr(services, "email_worker", None), "statistics")
        if stats is None:
            return
        jobs = _counter("hub_email_jobs_total")
        for outcome in ("sent", "retried", "dead"):
            if outcome in stats:
                jobs.add_metric([outcome], stats[outcome])
        yield jobs
        yield from _simple(stats, "in_flight", "hub_email_jobs_in_flight")

    def _amqp_links(self, services: Any) -> Iterator[Metric]:
        """Connection state of the RabbitMQ links whose owners expose them as ``link``."""
        owners = {
            "ingest": getattr(self._node, "ingest", None),
            "email": getattr(services, "email", None),
        }
        links = {
            name: stats
            for name, owner in owners.items()
            if (stats := _read(getattr(owner, "link", None), "statistics")) is not None
        }
        if not links:
            return
        connected = _gauge("hub_amqp_connected")
        reconnects = _counter("hub_amqp_reconnects_total")
        for name, link in links.items():
            connected.add_metric([name], float(bool(link.get("connected"))))
            reconnects.add_metric([name], _number(link, "reconnects") or 0)
        yield connected
        yield reconnects

    def _webhooks(self, webhooks: Any) -> Iterator[Metric]:
        stats = _read(webhooks, "statistics", "stats")
        if stats is None:
            return
        yield from _simple(stats, "attempts", "hub_webhook_attempts_total")
        # A failed attempt is either retried or, when it was the last, fails the delivery.
        failures = _counter("hub_webhook_failures_total")
        failures.add_metric([], (_number(stats, "retried") or 0) + (_number(stats, "failed") or 0))
        yield failures
        yield from _simple(stats, "queued", "hub_webhook_deliveries_queued_total")
        deliveries = _counter("hub_webhook_deliveries_total")
        for outcome in ("succeeded", "failed"):
            value = _number(stats, outcome)
            if value is not None:
                deliveries.add_metric([outcome], value)
        yield deliveries
        yield from _simple(stats, "in_flight", "hub_webhook_deliveries_in_flight")
        yield from _simple(stats, "dropped_events", "hub_webhook_events_dropped_total")

    # -- capacity ------------------------------------------------------------------------
    def _descriptors(self, node: Node) -> Iterator[Metric]:
        admission = _read(getattr(getattr(node, "realtime", None), "admission", None), "statistics")
        if admission is not None:
            refused = _counter("hub_websocket_upgrades_refused_total")
            for reason, count in sorted(_as_mapping(admission.get("refused")).items()):
                refused.add_metric([str(reason)], count)
            yield refused
        stats = _read(getattr(node, "descriptors", None), "statistics")
        if stats is None:
            return
        errors = _counter("hub_accept_errors_total")
        for name, count in sorted(_as_mapping(stats.get("accept_errors")).items()):
            errors.add_metric([str(name)], count)
        yield errors
        yield from _simple(stats, "shed", "hub_connections_shed_total")

    def _restarts(self) -> Iterator[Metric]:
        from hub.supervisor import SupervisorStats

        restarts = _counter("hub_service_restarts_total")
        for service, count in sorted(SupervisorStats.restarts.items()):
            restarts.add_metric([service], count)
        yield restarts


def _simple(stats: Mapping[str, Any], key: str, name: str) -> Iterator[Metric]:
    """One unlabelled family from ``stats[key]``, when the component reports it."""
    value = _number(stats, key)
    if value is None:
        return
    family = _counter(name) if spec(name).kind == "counter" else _gauge(name)
    family.add_metric([], value)
    yield family


def channel_subscribers(realtime: Any) -> dict[str, int]:
    """Local subscribers of each active channel, read from the realtime core.

    Uses ``realtime.hub.channel_counts()`` when the hub has it, else counts each channel
    actor's ``subscribers`` (plus those still recovering history)."""
    hub = getattr(realtime, "hub", None)
    if hub is None:
        return {}
    counts = getattr(hub, "channel_counts", None)
    if counts is not None:
        return dict(counts())
    result: dict[str, int] = {}
    for name, actor in list(getattr(hub, "channels", {}).items()):
        result[name] = len(getattr(actor, "subscribers", ())) + len(
            getattr(actor, "recovering", ())
        )
    return result
