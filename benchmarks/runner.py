"""``python -m benchmarks run``: every workload against the hub and its peers, in one go.

Each workload runs in a child process of its own (``python -m benchmarks workload NAME``,
in its own process group) which starts the servers and load generators it needs, pinned:
servers on :data:`NODE_CPU`, generators on :data:`GEN_CPU`. The child reports its steps as
``@@progress {json}`` lines on stdout (:class:`Progress`); this process draws one progress
bar per workload from them, copies everything else the child prints to
``<out>/logs/<name>.log``, and kills the child's process group when it outlives its
time limit. Then it merges the children's JSON into ``<out>/bench.json`` with

- ``ratios``: ours ÷ each peer on the same workload;
- ``targets``: the issue's targets, measured, and "met" or "missed by …";
- ``counting``: gaps, duplicates, bad frames, missing or extra deliveries and failed or
  lost connections summed over every workload and server (all must be 0), and which
  workloads ran;

draws the PNG plots (:mod:`benchmarks.plots`) and, for a full run, writes
``docs/benchmarks.md`` (:mod:`benchmarks.report`).

The exit status is 1 when a workload failed or a count is wrong; timing targets are
reported, never enforced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import import_module
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
NODE_CPU = 0
GEN_CPU = 1
PROGRESS_PREFIX = "@@progress "
#: After SIGTERM, how long a workload may take to clean up before SIGKILL.
TERM_GRACE_S = 20.0


@dataclass(frozen=True)
class Workload:
    """A workload: ``function(ctx) -> dict`` in ``module``, and its time limits."""

    name: str
    module: str
    function: str
    what: str
    limit_s: float
    quick_limit_s: float


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "fanout",
            "benchmarks.workloads",
            "fanout",
            "one channel, N = 1,000 / 5,000 / 10,000 subscribers",
            3600,
            100,
        ),
        Workload(
            "users",
            "benchmarks.workloads",
            "users",
            "10,000 users, each on user.<id> plus global",
            3600,
            100,
        ),
        Workload(
            "idle",
            "benchmarks.idle",
            "idle",
            "10,000 and 50,000 idle connections with heartbeats",
            3600,
            100,
        ),
        Workload("ingest", "benchmarks.workloads", "ingest", "RabbitMQ → WebSocket", 3600, 100),
        Workload(
            "rest",
            "benchmarks.rest",
            "rest",
            "GET /users/me with the Redis cache; loop lag during a login burst",
            1800,
            100,
        ),
        Workload(
            "cluster",
            "benchmarks.workloads",
            "cluster",
            "one node vs two nodes on Redis",
            3600,
            100,
        ),
    )
}


# --------------------------------------------------------------------------- child side


class Progress:
    """Step reports from a workload child to the runner (one JSON line each)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout

    def _emit(self, event: dict[str, Any]) -> None:
        self._stream.write(PROGRESS_PREFIX + json.dumps(event) + "\n")
        self._stream.flush()

    def total(self, steps: int) -> None:
        """Announce how many steps the workload has."""
        self._emit({"total": steps})

    def step(self, what: str, advance: int = 1) -> None:
        """One step done; ``what`` is shown beside the bar."""
        self._emit({"advance": advance, "what": what})

    def status(self, what: str) -> None:
        """What is running now (no step done)."""
        self._emit({"advance": 0, "what": what})

    @contextlib.contextmanager
    def steps_on_lines(self, pattern: str) -> Iterator[None]:
        """While inside, every printed line matching ``pattern`` counts as a step (for
        benchmark functions that only print as they go)."""
        regex = re.compile(pattern)
        original = sys.stdout
        progress = self

        class Tee:
            def write(self, text: str) -> int:
                original.write(text)
                for line in text.splitlines():
                    if regex.search(line):
                        progress.step(line.strip()[:80])
                return len(text)

            def flush(self) -> None:
                original.flush()

        sys.stdout = Tee()  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout = original


@dataclass
class Context:
    """What a workload function gets.

    Attributes:
        quick: the CI smoke sizes (small N, short windows): counting, not timing.
        progress: step reports for the runner's bar.
        out_dir: where results (and profiles, under ``profiles/``) go.
        profile: also record py-spy profiles of the hub (extra runs, not measured).
        servers: which servers to run (the hub and both peers by default).
    """

    quick: bool
    progress: Progress
    out_dir: Path
    profile: bool = False
    servers: tuple[str, ...] = ("hub", "websockets", "socketio")
    quiet_wait_s: float | None = None
    node_cpu: int = NODE_CPU
    gen_cpu: int = GEN_CPU

    @property
    def profile_dir(self) -> Path:
        path = self.out_dir / "profiles"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every cleanup


def workload_main(argv: Sequence[str]) -> int:
    """``python -m benchmarks workload NAME --result FILE [--quick] [--profile] …``"""
    from benchmarks.loadgen import raise_nofile

    parser = argparse.ArgumentParser(prog="python -m benchmarks workload")
    parser.add_argument("name", choices=sorted(WORKLOADS))
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--servers", default="hub,websockets,socketio")
    parser.add_argument("--quiet-wait", type=float, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    raise_nofile()
    workload = WORKLOADS[args.name]
    function: Callable[[Context], dict[str, Any]] = getattr(
        import_module(workload.module), workload.function
    )
    ctx = Context(
        quick=args.quick,
        progress=Progress(),
        out_dir=args.out,
        profile=args.profile,
        servers=tuple(s for s in args.servers.split(",") if s),
        quiet_wait_s=args.quiet_wait,
    )
    started = time.monotonic()
    result = function(ctx)
    result["seconds"] = round(time.monotonic() - started, 1)
    args.result.write_text(json.dumps(result, indent=1) + "\n")
    return 0


# --------------------------------------------------------------------------- helpers


def cdf_points(values: Sequence[float], points: int = 200) -> list[float]:
    """``points + 1`` evenly spaced quantiles (q0 … q100) of ``values`` (nearest rank),
    enough to draw a CDF without keeping every sample; ``[]`` for no values."""
    if not values:
        return []
    ordered = sorted(values)
    last = len(ordered) - 1
    return [round(ordered[round(last * i / points)], 3) for i in range(points + 1)]


COUNT_KEYS = (
    "gaps",
    "duplicates",
    "bad_frames",
    "missing",
    "extra",
    "connections_failed",
    "connections_lost",
)


def counting_of(checks: dict[str, Any]) -> dict[str, int]:
    """The count checks of one run (the fan-out benchmark's ``checks`` shape), with
    short names: every value must be 0."""
    return {
        "gaps": int(checks.get("sample_gaps", 0)),
        "duplicates": int(checks.get("sample_duplicates", 0)),
        "bad_frames": int(checks.get("bad_frames", 0)),
        "missing": int(checks.get("missing_deliveries", 0)),
        "extra": int(checks.get("extra_deliveries", 0)),
        "connections_failed": int(checks.get("connections_failed", 0)),
        "connections_lost": int(checks.get("connections_lost", 0)),
    }


def add_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {key: total.get(key, 0) + more.get(key, 0) for key in COUNT_KEYS}


def verdict(measured: float | None, target: float, higher_is_better: bool, unit: str) -> str:
    """``"met"`` or ``"missed by X unit (Y%)"``."""
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        return "not measured"
    ok = measured >= target if higher_is_better else measured <= target
    if ok:
        return "met"
    gap = abs(target - measured)
    pct = 100 * gap / target if target else float("inf")
    return f"missed by {_fmt(gap)} {unit} ({pct:.0f}%)".replace("  ", " ")


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


# --------------------------------------------------------------------------- summary


def _fanout_rate(report: dict[str, Any], server: str, n: int) -> float | None:
    for run in report.get("runs", []):
        if run.get("server") == server and run.get("n") == n:
            return float(run["phases"]["max"]["delivered_per_s"])
    return None


def ratios(workloads: dict[str, Any]) -> dict[str, Any]:
    """Ours ÷ each peer, per workload and size (higher is better for throughput)."""
    out: dict[str, Any] = {}

    def ratio(ours: float | None, peer: float | None) -> float | None:
        if ours is None or not peer:
            return None
        return round(ours / peer, 2)

    fan = workloads.get("fanout", {})
    if fan.get("runs"):
        ns = sorted({run["n"] for run in fan["runs"]})
        out["fanout_deliveries_per_s"] = {
            peer: {
                str(n): ratio(_fanout_rate(fan, "hub", n), _fanout_rate(fan, peer, n)) for n in ns
            }
            for peer in ("websockets", "socketio")
        }
    users = workloads.get("users", {})
    if users.get("runs"):
        by = {run["server"]: run for run in users["runs"] if "phases" in run}
        hub = by.get("hub")
        if hub:
            out["users_deliveries_per_s"] = {
                peer: {
                    kind: ratio(
                        hub["phases"][kind]["max"]["delivered_per_s"],
                        by[peer]["phases"][kind]["max"]["delivered_per_s"],
                    )
                    for kind in hub["phases"]
                }
                for peer in ("websockets", "socketio")
                if peer in by
            }
    idle = workloads.get("idle", {})
    if idle.get("runs"):
        by = {run["server"]: run for run in idle["runs"] if run.get("levels")}
        hub = by.get("hub")
        if hub:
            out["idle_kb_per_connection"] = {
                peer: ratio(hub.get("kb_per_connection"), by[peer].get("kb_per_connection"))
                for peer in by
                if peer != "hub"
            }
            out["idle_broadcast_p99_s"] = {
                peer: ratio(hub.get("broadcast_p99_s"), by[peer].get("broadcast_p99_s"))
                for peer in by
                if peer != "hub"
            }
    ingest = workloads.get("ingest", {})
    if ingest.get("runs"):
        rates: dict[tuple[str, int], float] = {
            (run["server"], run["channels"]): run["phases"]["max"]["ingested_per_s"]
            for run in ingest["runs"]
        }
        out["ingest_msgs_per_s"] = {
            "socketio": {
                str(c): ratio(rates.get(("hub", c)), rates.get(("socketio", c))) for (_, c) in rates
            }
        }
    rest = workloads.get("rest", {})
    if rest.get("runs"):
        by = {run["server"]: run for run in rest["runs"]}
        hub = by.get("hub")
        if hub:
            out["rest_requests_per_s"] = {
                peer: ratio(
                    hub["users_me"]["max"]["requests_per_s"],
                    by[peer]["users_me"]["max"]["requests_per_s"],
                )
                for peer in by
                if peer != "hub"
            }
    cluster = workloads.get("cluster", {})
    if cluster.get("runs"):
        rate = {
            (run["server"], run["nodes"]): run["phases"]["max"]["delivered_per_s"]
            for run in cluster["runs"]
            if "phases" in run
        }
        out["cluster_deliveries_per_s"] = {
            "socketio": {
                f"{n} node(s)": ratio(rate.get(("hub", n)), rate.get(("socketio", n)))
                for n in (1, 2)
            }
        }
    return out


#: The issue's targets (per node on the 2-core machine).
TARGETS: list[dict[str, Any]] = [
    {
        "name": "fanout_vs_socketio_at_5000",
        "what": "fan-out deliveries/s at N = 5,000, ours ÷ python-socketio",
        "target": 20.0,
        "unit": "×",
        "higher_is_better": True,
    },
    {
        "name": "fanout_vs_websockets_at_5000",
        "what": "fan-out deliveries/s at N = 5,000, ours ÷ websockets.broadcast()",
        "target": 2.0,
        "unit": "×",
        "higher_is_better": True,
    },
    {
        "name": "idle_kb_per_connection",
        "what": "node RSS per idle connection (slope up to the largest level)",
        "target": 12.0,
        "unit": "KB",
        "higher_is_better": False,
    },
    {
        "name": "idle_connections_held",
        "what": "idle connections held through the heartbeat window, none lost",
        "target": 50_000,
        "unit": "connections",
        "higher_is_better": True,
    },
    {
        "name": "idle_broadcast_p99_s",
        "what": "broadcast to every idle connection (largest level), p99 over broadcasts",
        "target": 1.0,
        "unit": "s",
        "higher_is_better": False,
    },
    {
        "name": "rest_loop_lag_p99_ms",
        "what": "event-loop lag seen by WebSocket clients during the login burst, p99",
        "target": 10.0,
        "unit": "ms",
        "higher_is_better": False,
    },
]


def measured_targets(workloads: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """Each target with its measured value and verdict (quick runs are smaller than the
    targets' sizes: their verdicts say so)."""
    fan = workloads.get("fanout", {})
    n_ref = 5000 if not quick else max((run["n"] for run in fan.get("runs", [])), default=0)
    hub_rate = _fanout_rate(fan, "hub", n_ref)
    measured: dict[str, tuple[float | None, str]] = {}
    for peer in ("socketio", "websockets"):
        peer_rate = _fanout_rate(fan, peer, n_ref)
        value = round(hub_rate / peer_rate, 2) if hub_rate and peer_rate else None
        measured[f"fanout_vs_{peer}_at_5000"] = (value, f"N = {n_ref:,}")
    idle = {run["server"]: run for run in workloads.get("idle", {}).get("runs", [])}
    hub_idle = idle.get("hub", {})
    top = f"at {hub_idle.get('largest_level')}"
    if hub_idle.get("levels_capped"):
        top += (
            f" (the process's RLIMIT_NOFILE is {hub_idle['open_files_limit']:,}: "
            "larger levels need the hard limit raised)"
        )
    measured["idle_kb_per_connection"] = (hub_idle.get("kb_per_connection"), top)
    measured["idle_connections_held"] = (hub_idle.get("connections_held"), top)
    measured["idle_broadcast_p99_s"] = (hub_idle.get("broadcast_p99_s"), top)
    rest = {run["server"]: run for run in workloads.get("rest", {}).get("runs", [])}
    lag = rest.get("hub", {}).get("login_burst", {}).get("lag_ms_p99")
    logins = rest.get("hub", {}).get("login_burst", {}).get("logins")
    measured["rest_loop_lag_p99_ms"] = (lag, f"{logins} logins")
    out = []
    for target in TARGETS:
        value, where = measured.get(target["name"], (None, ""))
        entry = dict(target)
        entry["measured"] = value
        entry["where"] = where
        entry["verdict"] = verdict(
            value, target["target"], target["higher_is_better"], target["unit"]
        )
        if quick:
            entry["verdict"] += " (quick run: smaller sizes, not the target's)"
        out.append(entry)
    return out


def counting(workloads: dict[str, Any]) -> dict[str, Any]:
    """Counts summed over everything, per workload too."""
    total = dict.fromkeys(COUNT_KEYS, 0)
    per: dict[str, Any] = {}
    for name, report in workloads.items():
        counts = report.get("counting")
        if counts is None:
            continue
        per[name] = counts
        total = add_counts(total, counts)
    return {"total": total, "by_workload": per}


# --------------------------------------------------------------------------- parent side


@dataclass
class ChildResult:
    name: str
    returncode: int | None
    seconds: float
    result: dict[str, Any] | None
    error: str | None = None
    log: str = ""
    tail: list[str] = field(default_factory=list)


def _reader(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def run_child(
    workload: Workload,
    args: argparse.Namespace,
    on_event: Callable[[dict[str, Any]], None],
) -> ChildResult:
    """Run one workload child, bounded by its time limit; its process group is always
    gone when this returns."""
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result_path = args.out / f".{workload.name}.partial.json"
    result_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "workload",
        workload.name,
        "--result",
        str(result_path),
        "--out",
        str(args.out),
        "--servers",
        args.servers,
    ]
    if args.quick:
        command.append("--quick")
    if args.profile:
        command.append("--profile")
    if args.quiet_wait is not None:
        command += ["--quiet-wait", str(args.quiet_wait)]
    limit = workload.quick_limit_s if args.quick else workload.limit_s
    limit *= args.limit_factor
    started = time.monotonic()
    log_path = logs / f"{workload.name}.log"
    tail: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True)
        reader.start()
        timed_out = False
        try:
            while True:
                remaining = started + limit - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                try:
                    line = lines.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    continue
                if line is None:
                    break
                if line.startswith(PROGRESS_PREFIX):
                    with contextlib.suppress(ValueError):
                        on_event(json.loads(line[len(PROGRESS_PREFIX) :]))
                    continue
                log.write(line)
                log.flush()
                tail = [*tail, line.rstrip()][-30:]
                if line.strip():
                    on_event({"advance": 0, "what": line.strip()[:80], "log": True})
        finally:
            _stop_group(process)
            reader.join(2)
    seconds = time.monotonic() - started
    result = None
    error = None
    if result_path.exists():
        with contextlib.suppress(ValueError):
            result = json.loads(result_path.read_text())
        result_path.unlink(missing_ok=True)
    if timed_out:
        error = f"killed after its time limit of {limit:.0f} s"
    elif process.returncode != 0 or result is None:
        error = f"exit status {process.returncode}: " + " | ".join(tail[-5:])
    return ChildResult(
        workload.name,
        process.returncode,
        round(seconds, 1),
        result,
        error,
        str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path),
        tail,
    )


def _stop_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM the child's process group (its cleanup runs), SIGKILL after a grace."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # leftovers of the group, if any
    if process.poll() is None:
        process.wait(5)


def parse_run_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks run",
        description="Run the benchmark workloads against the hub and its peers.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke sizes (well under two minutes): counts every frame, no timing targets",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        help=f"run only these workloads (repeat or comma-separate): {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default {RESULTS.relative_to(ROOT)}, quick: …/quick)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help=f"write the Markdown report here (default for a full run: {DOCS.relative_to(ROOT)})",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write the Markdown report")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy profiles of the hub in extra runs (default: on for a full run)",
    )
    parser.add_argument(
        "--servers",
        default="hub,websockets,socketio",
        help="servers to run (default all three)",
    )
    parser.add_argument(
        "--limit-factor", type=float, default=1.0, help="scale every workload's time limit"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="seconds a measured window may wait for the machine to be nearly idle "
        "(default: 300 for fan-out windows, 120 for cluster, 0 with --quick)",
    )
    parser.add_argument("--note", default=None, help="a remark shown at the top of the report")
    args = parser.parse_args(argv)
    names: list[str] = []
    for item in args.only or []:
        names += [name.strip() for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)} (known: {', '.join(WORKLOADS)})")
    args.names = names or list(WORKLOADS)
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    args.out = args.out.resolve()
    if args.profile is None:
        args.profile = not args.quick
    if args.docs is None and not args.quick and not args.no_docs:
        args.docs = DOCS
    if args.no_docs:
        args.docs = None
    return args


def run_main(argv: Sequence[str]) -> int:
    """``python -m benchmarks run``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as Bars

    from benchmarks.loadgen import machine_info

    args = parse_run_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=False)
    interactive = console.is_terminal
    started = datetime.now(UTC)
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "suite",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "benchmarks", "run", *argv]),
        "quick": args.quick,
        "note": args.note,
        "machine": machine_info(),
        "pinning": {"servers": NODE_CPU, "generators": GEN_CPU},
        "workloads": {},
        "runs": {},
    }
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    bars = Bars(
        TextColumn("{task.fields[name]:<8}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
        disable=not interactive,
    )
    with bars:
        tasks: dict[str, TaskID] = {
            name: bars.add_task("waiting", name=name, total=None, start=False)
            for name in args.names
        }
        for name in args.names:
            task = tasks[name]
            bars.start_task(task)
            bars.update(task, description=WORKLOADS[name].what)
            if not interactive:
                print(f"[{name}] {WORKLOADS[name].what} …", flush=True)

            def on_event(event: dict[str, Any], task: TaskID = task, name: str = name) -> None:
                if "total" in event:
                    bars.update(task, total=event["total"])
                    return
                bars.update(task, advance=event.get("advance", 0), description=event["what"])
                if not interactive and not event.get("log"):
                    done = bars.tasks[task].completed
                    total = bars.tasks[task].total
                    print(f"[{name}] {done:.0f}/{total or '?'} {event['what']}", flush=True)

            try:
                child = run_child(WORKLOADS[name], args, on_event)
            except KeyboardInterrupt:
                interrupted = True
                report["runs"][name] = {"error": "interrupted"}
                break
            entry: dict[str, Any] = {
                "seconds": child.seconds,
                "returncode": child.returncode,
                "log": child.log,
            }
            if child.error:
                entry["error"] = child.error
            report["runs"][name] = entry
            if child.result is not None:
                report["workloads"][name] = child.result
            state = "done" if not child.error else f"FAILED: {child.error[:60]}"
            bars.update(task, description=state)
            if not interactive:
                print(f"[{name}] {state} ({child.seconds:.0f} s)", flush=True)
    report["ratios_note"] = (
        "ours ÷ peer on the same workload and size: above 1 is better for deliveries/s, "
        "msgs/s and requests/s; below 1 is better for KB per connection and broadcast time"
    )
    report["seconds"] = round(time.monotonic() - t0, 1)
    out_json = args.out / "bench.json"
    finish(report, out_json, args.docs if report["workloads"] else None, plots=not args.no_plots)
    report["ok"] = report["ok"] and not interrupted
    print_summary(report, out_json, args.docs)
    return 0 if report["ok"] else 1


def finish(report: dict[str, Any], out_json: Path, docs: Path | None, *, plots: bool) -> None:
    """Recompute the derived parts of ``report`` (ratios, targets, counting, verdict),
    write it to ``out_json``, draw the plots next to it and render ``docs``."""
    workloads = report["workloads"]
    report["ratios"] = ratios(workloads)
    report["targets"] = measured_targets(workloads, bool(report.get("quick")))
    report["counting"] = counting(workloads)
    names = list(report["runs"])
    ran = [n for n in names if n in workloads and "error" not in report["runs"][n]]
    report["workloads_ran"] = ran
    report["workloads_failed"] = [n for n in names if n not in ran]
    counts_ok = all(value == 0 for value in report["counting"]["total"].values())
    report["ok"] = (
        not report["workloads_failed"]
        and counts_ok
        and all(workloads[n].get("checks_ok", False) for n in ran)
    )
    if plots and workloads:
        from benchmarks.plots import draw_all

        try:
            drawn = draw_all(report, out_json.parent / "plots")
            report["plots"] = [str(p.relative_to(out_json.parent)) for p in drawn]
            report.pop("plots_error", None)
        except Exception as error:  # plots are a by-product: report, don't lose the run
            report["plots_error"] = f"{type(error).__name__}: {error}"
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    if docs is not None:
        from benchmarks.report import write_markdown

        write_markdown(report, out_json, docs)


def merge_main(argv: Sequence[str]) -> int:
    """``python -m benchmarks merge FROM.json INTO.json [--docs PATH]``: the workloads of
    a partial run (``run --only …``) replace the same workloads of a full report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks merge")
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    source = json.loads(args.source.read_text())
    report = json.loads(args.target.read_text())
    for name, result in source["workloads"].items():
        report["workloads"][name] = result
        entry = dict(source["runs"][name])
        entry["merged_from"] = f"{source.get('command')} ({source.get('date')})"
        report["runs"][name] = entry
    finish(report, args.target, args.docs, plots=True)
    print_summary(report, args.target, args.docs)
    return 0


def print_summary(report: dict[str, Any], out_json: Path, docs: Path | None) -> None:
    from benchmarks.report import summary_lines

    print()
    for line in summary_lines(report):
        print(line)
    print(f"\nwrote {out_json}" + (f" and {docs}" if docs else ""))
