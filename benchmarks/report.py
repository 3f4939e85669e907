"""``docs/benchmarks.md`` and the terminal summary, generated from a suite report.

Everything in the Markdown comes from ``bench.json`` except the method text below, so the
document and the figures cannot drift apart: re-run the suite (or ``python -m benchmarks
docs``) and it is rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LABELS = {
    "hub": "notification-hub",
    "websockets": "websockets `broadcast()`",
    "socketio": "python-socketio",
}


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and digits == 0):
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def counts_cell(checks: dict[str, Any]) -> str:
    """``gaps/dups/bad/missing`` of one run's checks."""
    gaps = checks.get("sample_gaps", 0)
    dups = checks.get("sample_duplicates", 0)
    bad = checks.get("bad_frames", 0)
    missing = checks.get("missing_deliveries", 0)
    return f"{gaps}/{dups}/{bad}/{missing}"


# --------------------------------------------------------------------------- sections


def targets_section(report: dict[str, Any]) -> list[str]:
    rows = []
    for t in report.get("targets", []):
        op = "≥" if t["higher_is_better"] else "≤"
        rows.append(
            [
                t["what"],
                f"{op} {_n(t['target'], 1 if t['target'] < 100 else 0)} {t['unit']}",
                f"{_n(t['measured'], 2)} {t['unit']}" if t["measured"] is not None else "–",
                t.get("where", ""),
                f"**{t['verdict']}**",
            ]
        )
    return _table(
        ["target (per node, 2-core machine)", "target", "measured", "at", "verdict"], rows
    )


def fixed_load(fan: dict[str, Any]) -> float | None:
    """Deliveries/s of the fan-out workload's fixed-load window."""
    value = fan.get("parameters", {}).get("fixed_deliveries_per_s")
    return float(value) if value else None


def _fixed_cell(phase: dict[str, Any] | None) -> str:
    if phase is None:
        return "over max"
    return f"{_n(phase['latency_ms_p50'], 1)} / {_n(phase['latency_ms_p99'], 1)}"


def fanout_section(report: dict[str, Any]) -> list[str]:
    fan = report.get("workloads", {}).get("fanout", {})
    runs = fan.get("runs", [])
    if not runs:
        return []
    hub = {r["n"]: r for r in runs if r["server"] == "hub"}
    rows = []
    for run in sorted(runs, key=lambda r: (r["n"], list(LABELS).index(r["server"]))):
        m, h = run["phases"]["max"], run["phases"]["half"]
        ours = hub.get(run["n"])
        ratio = (
            ours["phases"]["max"]["delivered_per_s"] / m["delivered_per_s"]
            if ours and run["server"] != "hub" and m["delivered_per_s"]
            else None
        )
        rows.append(
            [
                _n(run["n"]),
                LABELS[run["server"]],
                _n(m["delivered_per_s"]),
                _ratio(ratio) if run["server"] != "hub" else "",
                f"{_n(h['latency_ms_p50'], 1)} / {_n(h['latency_ms_p99'], 1)}",
                _fixed_cell(run["phases"].get("fixed")),
                f"{_n(m['node_cpu_pct'])}%",
                f"{_n(m['gen_cpu_pct'] + m['pub_cpu_pct'])}%",
                _n(m.get("node_us_per_delivery"), 2),
                counts_cell(run["checks"]),
            ]
        )
    lines = [
        "## Fan-out: one channel, N subscribers",
        "",
        "Deliveries/s at max load (closed loop, 8 publishes in flight); latency at 50% of "
        "each server's own max (open loop, from the publisher's scheduled send time), and "
        f'at one load for every server ({_n(fixed_load(fan))} deliveries/s; "over max" '
        "where that is more than 90% of the server's max). "
        "\"ours ÷ peer\" is the hub's deliveries/s divided by the peer's at the same N.",
        "",
    ]
    lines += _table(
        [
            "N",
            "server",
            "deliveries/s",
            "ours ÷ peer",
            "p50 / p99 ms @50%",
            "p50 / p99 ms @fixed load",
            "server CPU",
            "generator CPU",
            "server µs/delivery",
            "gaps/dups/bad/missing",
        ],
        rows,
    )
    return lines


def users_section(report: dict[str, Any]) -> list[str]:
    users = report.get("workloads", {}).get("users", {})
    runs = [r for r in users.get("runs", []) if "phases" in r]
    if not runs:
        return []
    params = users.get("parameters", {})
    hub = next((r for r in runs if r["server"] == "hub"), None)
    rows = []
    for run in runs:
        for kind, phases in run["phases"].items():
            m, h = phases["max"], phases["half"]
            ratio = None
            if hub is not None and run["server"] != "hub" and m["delivered_per_s"]:
                ratio = hub["phases"][kind]["max"]["delivered_per_s"] / m["delivered_per_s"]
            rows.append(
                [
                    LABELS[run["server"]],
                    kind,
                    _n(m["published_per_s"], 1),
                    _n(m["delivered_per_s"]),
                    _ratio(ratio) if run["server"] != "hub" else "",
                    f"{_n(h['latency_ms_p50'], 1)} / {_n(h['latency_ms_p99'], 1)}",
                    f"{_n(m['node_cpu_pct'])}%",
                ]
            )
        rows[-1][-1] += f" (checks {counts_cell(run['checks'])})"
    lines = [
        f"## {params.get('users', 0):,} users, each on `user.<id>` plus `global`",
        "",
        f"Each user has one connection subscribed to its own channel and `global`. "
        f"*private*: each request publishes to {params.get('batch')} user channels "
        f"(`channels: [...]`, round robin over all users), so one request is "
        f"{params.get('batch')} deliveries to different connections; *global*: each "
        f"request reaches every user.",
        "",
    ]
    lines += _table(
        [
            "server",
            "publish",
            "requests/s",
            "deliveries/s",
            "ours ÷ peer",
            "p50 / p99 ms @50%",
            "server CPU",
        ],
        rows,
    )
    return lines


def idle_section(report: dict[str, Any]) -> list[str]:
    idle = report.get("workloads", {}).get("idle", {})
    runs = [r for r in idle.get("runs", []) if r.get("levels")]
    if not runs:
        return []
    rows = []
    for run in runs:
        for level in run["levels"]:
            b = level.get("broadcast", {})
            rows.append(
                [
                    LABELS[run["server"]],
                    _n(level["connections"]),
                    _n(level["open_seconds"], 1),
                    _n(level["rss_kb"] / 1024),
                    _n(level.get("kb_per_connection_from_first"), 1),
                    f"{_n(b.get('all_s_p50'), 3)} / {_n(b.get('all_s_p99'), 3)}" if b else "",
                    (
                        f"{_n(b.get('per_connection_ms_p50'), 1)} / "
                        f"{_n(b.get('per_connection_ms_p99'), 1)}"
                    )
                    if b
                    else "",
                ]
            )
    held = []
    for run in runs:
        hb = run["heartbeats"]
        held.append(
            [
                LABELS[run["server"]],
                _n(run["levels"][-1]["connections"]),
                _n(hb["held_s"], 0),
                f"{hb['interval_s']} / {hb['timeout_s']} s",
                _n(hb["client_pings_sent"] + hb["server_pings_answered"]),
                _n(run["checks"]["connections_lost"]),
                str(run["checks"]["close_codes"] or "none"),
                f"{_n(hb['server_cpu_pct_while_idle'], 1)}%",
            ]
        )
    lines = [
        "## Idle connections with heartbeats",
        "",
        "RSS of the server process (kernel socket buffers not included). KB/conn is the "
        "slope from the first level. Broadcast: one message to every connection; *to all* "
        "is when the last connection had it (p50 / p99 over the broadcasts), *per "
        "connection* is each connection's own latency. Arrival is the kernel's receive "
        "timestamp of the frame (`SO_TIMESTAMPNS`), so the generator's read speed does not "
        "count.",
        "",
    ]
    lines += _table(
        [
            "server",
            "connections",
            "open s",
            "RSS MB",
            "KB/conn",
            "broadcast to all, s p50 / p99",
            "per connection, ms p50 / p99",
        ],
        rows,
    )
    lines += ["", "Held at the largest level:", ""]
    lines += _table(
        [
            "server",
            "connections",
            "held s",
            "heartbeat interval / timeout",
            "heartbeats exchanged",
            "lost",
            "close codes",
            "server CPU while idle",
        ],
        held,
    )
    return lines


def ingest_section(report: dict[str, Any]) -> list[str]:
    ingest = report.get("workloads", {}).get("ingest", {})
    runs = ingest.get("runs", [])
    if not runs:
        return []
    rate = {(r["server"], r["channels"]): r["phases"]["max"]["ingested_per_s"] for r in runs}
    rows = []
    for run in runs:
        m, h = run["phases"]["max"], run["phases"]["half"]
        peer_rate = m["ingested_per_s"]
        ours = rate.get(("hub", run["channels"]))
        rows.append(
            [
                LABELS[run["server"]],
                f"{_n(run['subscribers'])} × {_n(run['channels'])}",
                _n(run["subscribers_per_message"]),
                _n(m["ingested_per_s"]),
                _ratio(ours / peer_rate) if run["server"] != "hub" and ours and peer_rate else "",
                _n(m["delivered_per_s"]),
                f"{_n(h['latency_ms_p50'], 1)} / {_n(h['latency_ms_p99'], 1)}",
                f"{_n(m['node_cpu_pct'])}% / {_n(m['rabbit_cpu_pct'])}%",
                counts_cell(run["checks"]),
            ]
        )
    lines = [
        "## Ingest: RabbitMQ → WebSocket",
        "",
        "`benchmarks/ingest.py`: the hub drains a prefilled `hub.notifications` queue; the "
        "python-socketio peer (`AsyncAioPikaManager`) consumes its own queue while the "
        "producers publish as fast as they can. Latency at 50% of max, from the producer's "
        "scheduled send time.",
        "",
    ]
    lines += _table(
        [
            "server",
            "subscribers × channels",
            "per message",
            "ingested msgs/s",
            "ours ÷ peer",
            "deliveries/s",
            "p50 / p99 ms @50%",
            "server / RabbitMQ CPU",
            "gaps/dups/bad/missing",
        ],
        rows,
    )
    return lines


def rest_section(report: dict[str, Any]) -> list[str]:
    rest = report.get("workloads", {}).get("rest", {})
    hub = next((r for r in rest.get("runs", []) if r["server"] == "hub"), None)
    if hub is None:
        return []
    m, h, b = hub["users_me"]["max"], hub["users_me"]["half"], hub["login_burst"]
    lines = [
        "## REST: `GET /users/me` with the Redis cache, and loop lag during logins",
        "",
    ]
    lines += _table(
        ["phase", "requests/s", "p50 / p99 / max ms", "server CPU", "errors", "Redis hits"],
        [
            [
                "max (closed loop)",
                _n(m["requests_per_s"]),
                f"{_n(m['latency_ms_p50'], 2)} / {_n(m['latency_ms_p99'], 2)} / "
                f"{_n(m['latency_ms_max'], 1)}",
                f"{_n(m['node_cpu_pct'])}%",
                _n(m["errors"]),
                _n(m.get("redis_keyspace_hits")),
            ],
            [
                "50% (open loop)",
                _n(h["requests_per_s"]),
                f"{_n(h['latency_ms_p50'], 2)} / {_n(h['latency_ms_p99'], 2)} / "
                f"{_n(h['latency_ms_max'], 1)}",
                f"{_n(h['node_cpu_pct'])}%",
                _n(h["errors"]),
                "",
            ],
        ],
    )
    lines += [
        "",
        f"Login burst: {b['logins']} logins at once (bcrypt cost {b['bcrypt_rounds']}), "
        f"{_n(b['burst_s'], 1)} s from the first request to the last answer; meanwhile "
        f"{b['probe_connections']} WebSocket connections sent a ping every "
        f"{_n(b['probe_interval_ms'], 0)} ms. Lag = round trip − the median round trip "
        f"before the burst ({_n(b['baseline_rtt_ms_p50'], 2)} ms).",
        "",
    ]
    lines += _table(
        ["pings during the burst", "round trip p50 / p99 / max ms", "lag p50 / p99 / max ms"],
        [
            [
                _n(b["samples_during_burst"]),
                f"{_n(b['rtt_ms_p50'], 2)} / {_n(b['rtt_ms_p99'], 2)} / {_n(b['rtt_ms_max'], 2)}",
                f"{_n(b['lag_ms_p50'], 2)} / {_n(b['lag_ms_p99'], 2)} / {_n(b['lag_ms_max'], 2)}",
            ]
        ],
    )
    return lines


def cluster_section(report: dict[str, Any]) -> list[str]:
    cluster = report.get("workloads", {}).get("cluster", {})
    runs = [r for r in cluster.get("runs", []) if "phases" in r]
    if not runs:
        return []
    rate = {(r["server"], r["nodes"]): r["phases"]["max"]["delivered_per_s"] for r in runs}
    rows = []
    for run in runs:
        m, h = run["phases"]["max"], run["phases"]["half"]
        lat = h["latency_by_node"]
        ours = rate.get(("hub", run["nodes"]))
        node_checks = [v for v in run["checks"].values() if isinstance(v, dict)]
        missing = sum(c["missing_deliveries"] for c in node_checks)
        gaps = sum(c["sample_gaps"] + c["sample_duplicates"] for c in node_checks)
        rows.append(
            [
                LABELS[run["server"]],
                str(run["nodes"]),
                _n(run["subscribers"]),
                _n(m["delivered_per_s"]),
                _ratio(ours / m["delivered_per_s"])
                if run["server"] != "hub" and ours and m["delivered_per_s"]
                else "",
                _n(m["cross_node_delivered_per_s"]),
                " · ".join(
                    f"{k} {_n(v['p50_ms'], 1)} / {_n(v['p99_ms'], 1)}" for k, v in lat.items()
                ),
                f"{gaps}/{missing}",
            ]
        )
    lines = [
        "## Cluster: one node vs two nodes on Redis",
        "",
        "N subscribers split evenly over the nodes; the publisher posts to node A, so node "
        "B's deliveries cross Redis. The hub uses its Redis broker; python-socketio its "
        "`AsyncRedisManager`. Two nodes on a 2-core machine that also runs Redis and the "
        "generator show the cost and correctness of the cross-node path, not scaling.",
        "",
    ]
    lines += _table(
        [
            "server",
            "nodes",
            "subscribers",
            "deliveries/s",
            "ours ÷ peer",
            "cross-node/s",
            "p50 / p99 ms @50% per node",
            "gaps/missing",
        ],
        rows,
    )
    return lines


def profiles_section(report: dict[str, Any]) -> list[str]:
    """The py-spy profiles of the run, with their top frames by own time."""
    found: list[tuple[str, dict[str, Any]]] = []
    workloads = report.get("workloads", {})
    for run in workloads.get("fanout", {}).get("runs", []):
        if run.get("profile") and run["profile"].get("collapsed_stacks"):
            found.append((f"fan-out, hub, N = {run['n']:,}, max load", run["profile"]))
    for run in workloads.get("idle", {}).get("runs", []):
        if run.get("profile") and run["profile"].get("collapsed_stacks"):
            found.append((f"broadcasts to {run['largest_level']}, hub", run["profile"]))
    for run in workloads.get("rest", {}).get("runs", []):
        if run.get("profile") and run["profile"].get("collapsed_stacks"):
            found.append(("login burst, hub", run["profile"]))
    if not found:
        return []
    lines = [
        "## Where the time goes (py-spy)",
        "",
        "Profiles of the hub recorded in extra runs (not in the measured windows), "
        "`py-spy record --rate 200 --nonblocking --format raw`; collapsed stacks under "
        "`benchmarks/results/profiles/`. Top frames by own time:",
        "",
    ]
    for title, profile in found:
        lines.append(f"**{title}** (`benchmarks/results/{profile['collapsed_stacks']}`):")
        lines.append("")
        for frame, pct in profile.get("own_pct", [])[:8]:
            lines.append(f"- {pct}% `{frame}`")
        lines.append("")
    return lines


def observations_section(report: dict[str, Any]) -> list[str]:
    """Flags computed from the figures: windows where the server was not the bottleneck
    (its CPU under 80% at max load), the generator came close to being one (over 80%),
    or other processes took a large share of the machine."""
    notes: list[str] = []
    workloads = report.get("workloads", {})
    for run in workloads.get("fanout", {}).get("runs", []):
        m = run["phases"]["max"]
        where = f"fan-out, {LABELS[run['server']]}, N = {run['n']:,}"
        if m["node_cpu_pct"] < 80:
            notes.append(
                f"{where}: server CPU {m['node_cpu_pct']}% at max load — the server was "
                f"not CPU-bound, so its {m['delivered_per_s']:,} deliveries/s is set by "
                "something that waits (publish round trips, socket buffers), not by CPU."
            )
        gen = m["gen_cpu_pct"] + m["pub_cpu_pct"]
        if gen > 80:
            notes.append(f"{where}: generator CPU {gen:.0f}% — close to being the bottleneck.")
        if m.get("foreign_cpu_pct", 0) > 25:
            notes.append(
                f"{where}: other processes took {m['foreign_cpu_pct']}% of a CPU in the "
                "measured window: treat as noisy."
            )
    for run in workloads.get("users", {}).get("runs", []):
        for kind, phases in run.get("phases", {}).items():
            m = phases["max"]
            if m["node_cpu_pct"] < 80:
                notes.append(
                    f"users ({kind}), {LABELS[run['server']]}: server CPU "
                    f"{m['node_cpu_pct']}% at max load — not CPU-bound."
                )
    for run in workloads.get("idle", {}).get("runs", []):
        lost = run["checks"]["connections_lost"]
        if lost:
            notes.append(
                f"idle, {LABELS[run['server']]}: {lost:,} connections lost while held "
                f"(close codes {run['checks']['close_codes']}); server CPU while opening "
                + ", ".join(
                    f"{lv.get('server_cpu_pct_while_opening', '?')}%" for lv in run["levels"]
                )
                + "."
            )
    if not notes:
        return []
    return ["## Observations (computed from the figures)", "", *[f"- {n}" for n in notes]]


METHOD = """\
## How it was measured

- **One command**: `python -m benchmarks run` runs every workload, each in a child process
  of its own, which starts the servers and generators it needs and stops them (process
  groups; every wait bounded). Only 127.0.0.0/8 addresses are used.
- **Pinning**: every server process on CPU 0, every load-generator process on CPU 1
  (`taskset` / `sched_setaffinity`), on a 2-vCPU machine. For the ingest workload,
  RabbitMQ is kept on CPU 1 for the run, ahead of the generator there (nice −10), as on
  a machine of its own: unpinned, its schedulers also run on the servers' core; at the
  generator's priority, the generator starves it at times; Redis is not pinned. The
  server's CPU % is reported so that a run where the server was not the bottleneck shows.
- **Generator** (`benchmarks/loadgen.py`): raw non-blocking sockets on epoll, hand-written
  WebSocket upgrade; *counting* processes count frames by their 2–10 byte headers in big
  batched reads, one *sample* process decodes every frame, checks the JSON and the
  per-channel offset continuity (gap, duplicate) and measures latency from the
  publisher's timestamp in `data.t`. The same generator drives all three servers; the
  peers speak enough of the hub's protocol (`benchmarks/peers/`). Its CPU use is
  reported ("generator CPU") and stays well under one core. The publisher posts to the
  REST publish route over keep-alive HTTP/1.1 connections.
- **Counting**: after each run every subscriber must have received every message
  (missing = expected − received), and the sample sees no gap, duplicate or bad frame.
  These counts are what `--quick` (and CI) check; timing figures are never asserted.
- **Connections** come from 127.0.0.1 … 127.0.0.8 (`IP_BIND_ADDRESS_NO_PORT`), which gets
  past the ~28,000 ephemeral ports of a single address pair; `RLIMIT_NOFILE` is raised.

### The peers, and how they were set up to be fair

- **websockets `broadcast()`** (`benchmarks/peers/websockets_server.py`, websockets on
  asyncio + uvloop): the library's recommended fan-out, one `set` of connections per
  channel, `broadcast()` writing each frame to every transport synchronously (no
  per-connection task, no backpressure: a slow client's buffer grows). Compression off
  (the hub does not compress). It cannot serve `POST`, so publishing goes to a minimal
  h11 keep-alive endpoint in the same event loop.
- **python-socketio** (`benchmarks/peers/socketio_server.py`) on uvicorn with uvloop,
  httptools and uvicorn's default WebSocket implementation (what `uvicorn[standard]`
  gives): one room per channel, `sio.emit("notification", frame, room=channel)`, the
  publish route an ASGI app beside socket.io in the same server; for the cluster
  workload `AsyncRedisManager`. Clients speak engine.io v4 straight over WebSocket
  (`/socket.io/?EIO=4&transport=websocket`), so the same raw-socket generator drives it
  (no python-socketio client processes to become the bottleneck).
- **Same work**: both peers fill in `data.id` (uuid4) and `data.timestamp` and keep a
  per-channel `<epoch>:<seq>` offset, as the hub does, and send the hub's frame
  `{"type":"notification","channel","offset","data":{…}}`, byte for byte the same size
  for websockets; socket.io wraps it in its event framing `42["notification",…]`
  (+19 bytes). The peers authenticate nobody (the hub checks a JWT on every connection
  and every publish) and keep no history (the hub stores every message in its channel
  history): any difference there favours the peers.
- **Heartbeats** (idle workload): each server's own mechanism, same interval. The hub
  expects a client `{"type":"ping"}` every `HEARTBEAT_INTERVAL` and closes after
  `HEARTBEAT_TIMEOUT` = 2 × interval; websockets pings every interval and closes when a
  pong is `ping_timeout` = interval late; socket.io sends engine.io `2` every interval
  and closes when `3` is `ping_timeout` = interval late. Fan-out runs turn the peers'
  pings off, since counting subscribers never answer them.
- Where a peer has no equivalent (websockets: no broker, cluster or REST layer;
  python-socketio: no REST layer) the row is absent rather than improvised.
"""


def reproduce_section(report: dict[str, Any], json_path: Path) -> list[str]:
    return [
        "## Reproduce",
        "",
        "```sh",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test,bench]'",
        "# RabbitMQ (ingest) and redis-server (rest, cluster) must be installed; ",
        "# scripts/test.sh starts them when they are.",
        ".venv/bin/python -m benchmarks run              # everything (see the time below)",
        ".venv/bin/python -m benchmarks run --quick      # smoke sizes, < 2 min (CI)",
        ".venv/bin/python -m benchmarks run --only fanout --only idle",
        ".venv/bin/python -m benchmarks docs             # rewrite this page from the JSON",
        "```",
        "",
        f"This page was generated from `{_rel(json_path)}` "
        f"(`{report.get('command', '')}`, {report.get('date', '')}, "
        f"{_n(report.get('seconds', 0) / 60, 1)} min). The plots are in "
        f"`{_rel(json_path.parent / 'plots')}/`, each workload's log in "
        f"`{_rel(json_path.parent / 'logs')}/`.",
    ]


def _rel(path: Path) -> str:
    root = Path(__file__).resolve().parent.parent
    with_root = path.resolve()
    return str(with_root.relative_to(root)) if with_root.is_relative_to(root) else str(path)


def plots_section(report: dict[str, Any], json_path: Path, docs_path: Path) -> list[str]:
    plots = report.get("plots", [])
    if not plots:
        return []
    lines = ["## Plots", ""]
    for plot in plots:
        target = os.path.relpath(json_path.parent / plot, docs_path.resolve().parent)
        name = Path(plot).stem.replace("-", " ")
        lines += [f"![{name}]({target})", ""]
    return lines


def write_markdown(report: dict[str, Any], json_path: Path, docs_path: Path) -> None:
    """Render the whole page to ``docs_path``."""
    machine = report.get("machine", {})
    counting = report.get("counting", {}).get("total", {})
    quick = report.get("quick")
    lines = [
        "# Benchmarks",
        "",
        "The hub measured side by side with python-socketio and the `websockets` library's "
        "`broadcast()`, on the same workloads, with the same load generator, in one run.",
        "",
        f"**Run**: {report.get('date', '')} · {machine.get('cpus')} × "
        f"{machine.get('cpu_model', '?')} · Python {machine.get('python', '?')} · "
        f"load average at start {machine.get('loadavg_at_start', ['?'])[0]}"
        + (" · **quick (smoke) sizes: not the target sizes**" if quick else ""),
        "",
    ]
    if report.get("note"):
        lines += [f"> {report['note']}", ""]
    lines += ["## Targets", ""]
    lines += targets_section(report)
    lines += [
        "",
        "Counting over every workload and server (all must be 0): "
        + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in counting.items())
        + f". Workloads run: {', '.join(report.get('workloads_ran', []))}"
        + (
            f"; failed: {', '.join(report['workloads_failed'])}"
            if report.get("workloads_failed")
            else ""
        )
        + ".",
        "",
    ]
    for section in (
        fanout_section,
        users_section,
        idle_section,
        ingest_section,
        rest_section,
        cluster_section,
        observations_section,
        profiles_section,
    ):
        body = section(report)
        if body:
            lines += [*body, ""]
    lines += plots_section(report, json_path, docs_path)
    lines += [METHOD, ""]
    lines += reproduce_section(report, json_path)
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text("\n".join(lines).rstrip() + "\n")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal at the end of a run."""
    lines = []
    for name, run in report.get("runs", {}).items():
        state = run.get("error") or "ok"
        lines.append(f"{name:<8} {run.get('seconds', 0):>6.0f} s  {state}")
    lines.append("")
    for target in report.get("targets", []):
        value = target["measured"]
        shown = "–" if value is None else f"{value:,.2f}"
        lines.append(f"{target['name']:<32} {shown:>10} {target['unit']:<12} {target['verdict']}")
    total = report.get("counting", {}).get("total", {})
    lines.append("")
    lines.append("counting: " + ", ".join(f"{k} {v}" for k, v in total.items()))
    for kind, table in report.get("ratios", {}).items():
        lines.append(f"ours ÷ peer, {kind}: {table}")
    lines.append(f"\n{'OK' if report.get('ok') else 'FAILED'} in {report.get('seconds', 0):.0f} s")
    return lines
