"""PNG plots of a suite report (``bench.json``), drawn with matplotlib (Agg backend).

:func:`draw_all` draws whichever plots the report has data for and returns their paths:

- ``fanout-delivered.png``: delivered messages/s against N, one line per server;
- ``fanout-latency-cdf.png``: publish → receive latency CDFs at 50% load, per N;
- ``users-delivered.png``: deliveries/s of the per-user workload (private batches, global);
- ``idle-memory.png``: server RSS against open connections;
- ``idle-broadcast-cdf.png``: per-connection broadcast latency at the largest level;
- ``rest-latency-cdf.png``: ``GET /users/me`` latency, and the WebSocket ping round trip
  before and during the login burst;
- ``ingest.png`` and ``cluster.png``: messages/s by server and layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLORS = {"hub": "#1f77b4", "websockets": "#2ca02c", "socketio": "#d62728"}
LABELS = {
    "hub": "notification-hub",
    "websockets": "websockets broadcast()",
    "socketio": "python-socketio",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, points: Sequence[float], **style: Any) -> None:
    if not points:
        return
    n = len(points) - 1
    ax.plot(points, [i / n for i in range(n + 1)], **style)


def _logx(ax: Any) -> None:
    """A log x axis labelled at powers of ten only (minor labels overlap)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig: Any, path: Path, title: str, quick: bool) -> Path:
    fig.suptitle(title + ("  [quick run: smoke sizes]" if quick else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def fanout_plots(report: dict[str, Any], out: Path, quick: bool) -> list[Path]:
    runs = report.get("workloads", {}).get("fanout", {}).get("runs", [])
    if not runs:
        return []
    plt = _plt()
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for server in COLORS:
        mine = sorted((r for r in runs if r["server"] == server), key=lambda r: r["n"])
        if mine:
            ax.plot(
                [r["n"] for r in mine],
                [r["phases"]["max"]["delivered_per_s"] for r in mine],
                marker="o",
                color=COLORS[server],
                label=LABELS[server],
            )
    ax.set_xlabel("subscribers of the channel (N)")
    ax.set_ylabel("delivered messages/s (max load)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "fanout-delivered.png", "Fan-out: deliveries/s against N", quick))

    ns = sorted({r["n"] for r in runs})
    fig, axes = plt.subplots(1, len(ns), figsize=(4.2 * len(ns), 3.8), squeeze=False)
    for ax, n in zip(axes[0], ns, strict=True):
        for run in (r for r in runs if r["n"] == n):
            _cdf(
                ax,
                run.get("latency_cdf_ms", {}).get("half", []),
                color=COLORS[run["server"]],
                label=LABELS[run["server"]],
            )
        _logx(ax)
        ax.set_xlabel("publish → receive latency, ms")
        ax.set_ylabel("fraction of messages")
        ax.set_title(f"N = {n:,}, 50% of each server's max")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / "fanout-latency-cdf.png", "Fan-out latency CDF", quick))
    return paths


def users_plot(report: dict[str, Any], out: Path, quick: bool) -> list[Path]:
    runs = [
        r for r in report.get("workloads", {}).get("users", {}).get("runs", []) if "phases" in r
    ]
    if not runs:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = list(runs[0]["phases"])
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [run["phases"][k]["max"]["delivered_per_s"] for k in kinds]
        xs = [j + i * width for j in range(len(kinds))]
        ax.bar(xs, values, width, color=COLORS[run["server"]], label=LABELS[run["server"]])
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(kinds))])
    ax.set_xticklabels(
        [f"{k} ({'100 user channels' if k == 'private' else 'global'} / request)" for k in kinds]
    )
    ax.set_ylabel("delivered messages/s (max load)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    users = runs[0].get("users", 0)
    return [
        _save(fig, out / "users-delivered.png", f"{users:,} users on user.<id> + global", quick)
    ]


def idle_plots(report: dict[str, Any], out: Path, quick: bool) -> list[Path]:
    runs = [
        r for r in report.get("workloads", {}).get("idle", {}).get("runs", []) if r.get("levels")
    ]
    if not runs:
        return []
    plt = _plt()
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        xs = [0] + [lv["connections"] for lv in run["levels"]]
        ys = [run["rss_kb_at_0"] / 1024] + [lv["rss_kb"] / 1024 for lv in run["levels"]]
        label = f"{LABELS[run['server']]}: {run['kb_per_connection']} KB/conn"
        ax.plot(xs, ys, marker="o", color=COLORS[run["server"]], label=label)
    ax.set_xlabel("open idle connections (with heartbeats)")
    ax.set_ylabel("server RSS, MB")
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "idle-memory.png", "Memory against connections", quick))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        top = run["levels"][-1]
        cdf = top.get("broadcast", {}).get("per_connection_cdf_ms", [])
        _cdf(ax, cdf, color=COLORS[run["server"]], label=f"{LABELS[run['server']]}")
    top_n = runs[0]["levels"][-1]["connections"]
    _logx(ax)
    ax.set_xlabel("publish → frame in the subscriber's socket (kernel timestamp), ms")
    ax.set_ylabel("fraction of connections")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths.append(
        _save(
            fig, out / "idle-broadcast-cdf.png", f"Broadcast to {top_n:,} idle connections", quick
        )
    )
    return paths


def rest_plot(report: dict[str, Any], out: Path, quick: bool) -> list[Path]:
    runs = report.get("workloads", {}).get("rest", {}).get("runs", [])
    hub = next((r for r in runs if r.get("server") == "hub"), None)
    if hub is None:
        return []
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for phase, style in (("max", "-"), ("half", "--")):
        data = hub["users_me"][phase]
        _cdf(left, data.get("latency_cdf_ms", []), linestyle=style, color=COLORS["hub"],
             label=f"{phase}: {data['requests_per_s']:,} req/s")  # fmt: skip
    _logx(left)
    left.set_xlabel("GET /users/me latency, ms")
    left.set_ylabel("fraction of requests")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    burst = hub["login_burst"]
    _cdf(right, burst.get("baseline_rtt_cdf_ms", []), color="grey", label="before the burst")
    _cdf(right, burst.get("rtt_cdf_ms", []), color=COLORS["hub"],
         label=f"during {burst['logins']} logins (bcrypt {burst['bcrypt_rounds']})")  # fmt: skip
    _logx(right)
    right.set_xlabel("WebSocket ping → pong, ms")
    right.set_ylabel("fraction of pings")
    right.grid(True, which="both", alpha=0.3)
    right.legend()
    return [_save(fig, out / "rest-latency-cdf.png", "REST latency and event-loop lag", quick)]


def bars_plot(report: dict[str, Any], out: Path, quick: bool) -> list[Path]:
    plt = _plt()
    paths = []
    ingest = report.get("workloads", {}).get("ingest", {}).get("runs", [])
    if ingest:
        fig, ax = plt.subplots(figsize=(7, 4))
        layouts = sorted({r["channels"] for r in ingest}, reverse=True)
        servers = [s for s in COLORS if any(r["server"] == s for r in ingest)]
        width = 0.8 / max(1, len(servers))
        for i, server in enumerate(servers):
            values = [
                next((r["phases"]["max"]["ingested_per_s"] for r in ingest
                      if r["server"] == server and r["channels"] == c), 0)
                for c in layouts
            ]  # fmt: skip
            ax.bar([j + i * width for j in range(len(layouts))], values, width,
                   color=COLORS[server], label=LABELS[server])  # fmt: skip
        ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(layouts))])
        subs = ingest[0]["subscribers"]
        ax.set_xticklabels([f"{subs:,} subscribers / {c:,} channels" for c in layouts])
        ax.set_ylabel("messages/s taken from RabbitMQ (max)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / "ingest.png", "RabbitMQ → WebSocket", quick))
    cluster = [
        r for r in report.get("workloads", {}).get("cluster", {}).get("runs", []) if "phases" in r
    ]
    if cluster:
        fig, ax = plt.subplots(figsize=(7, 4))
        servers = [s for s in COLORS if any(r["server"] == s for r in cluster)]
        width = 0.8 / max(1, len(servers))
        for i, server in enumerate(servers):
            values = [
                next((r["phases"]["max"]["delivered_per_s"] for r in cluster
                      if r["server"] == server and r["nodes"] == n), 0)
                for n in (1, 2)
            ]  # fmt: skip
            ax.bar([j + i * width for j in range(2)], values, width, color=COLORS[server],
                   label=LABELS[server])  # fmt: skip
        ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(2)])
        ax.set_xticklabels(["1 node", "2 nodes (Redis)"])
        ax.set_ylabel("delivered messages/s (max load)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / "cluster.png", "One node vs two nodes", quick))
    return paths


def draw_all(report: dict[str, Any], out: Path) -> list[Path]:
    """Every plot the report has data for, as PNGs in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    quick = bool(report.get("quick"))
    paths: list[Path] = []
    for draw in (fanout_plots, users_plot, idle_plots, rest_plot, bars_plot):
        paths += draw(report, out, quick)
    return paths
