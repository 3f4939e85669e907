"""Helpers to read a node's ``/metrics`` and WebSocket clients for the operations tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.harness import WAIT_S, RunningNode

Labels = dict[str, str]


class Scrape:
    """One parsed ``/metrics`` answer: families by name, samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float | None:
        """The value of sample ``sample`` whose labels include ``labels`` (``None`` if
        there is none; the sum when several match)."""
        found = [
            s.value
            for family in self.families.values()
            for s in family.samples
            if s.name == sample and labels.items() <= s.labels.items()
        ]
        return sum(found) if found else None

    def labels_of(self, sample: str) -> list[Labels]:
        return [
            dict(s.labels)
            for family in self.families.values()
            for s in family.samples
            if s.name == sample
        ]


async def scrape(running: RunningNode) -> Scrape:
    response = await running.client.get("/metrics")
    assert response.status_code == 200, response.text
    return Scrape(response.text)


def ws_url(running: RunningNode, token: str) -> str:
    return running.url.replace("http://", "ws://") + f"/ws/notifications?token={token}"


async def recv_json(ws: WebSocketConnection, frame_type: str) -> dict[str, Any]:
    """The next frame of ``frame_type`` (others are skipped)."""
    with trio.fail_after(WAIT_S):
        while True:
            frame: dict[str, Any] = json.loads(await ws.get_message())
            if frame["type"] == frame_type:
                return frame


@asynccontextmanager
async def subscriber(
    running: RunningNode, token: str, *channels: str
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client subscribed to ``channels`` (closed normally on exit)."""
    async with open_websocket_url(ws_url(running, token)) as ws:
        await recv_json(ws, "welcome")
        await ws.send_message(json.dumps({"type": "subscribe", "channels": list(channels)}))
        await recv_json(ws, "subscribed")
        yield ws


async def wait_ready_status(running: RunningNode, status: int) -> dict[str, Any]:
    """Ask ``/ready`` until it answers ``status`` (each answer runs every check anew);
    the body of that answer. Fails after :data:`WAIT_S`."""
    with trio.fail_after(WAIT_S):
        while True:
            response = await running.client.get("/ready")
            if response.status_code == status:
                body: dict[str, Any] = response.json()
                return body
            await trio.sleep(0.05)  # pacing between polls of a condition, not a sync point
