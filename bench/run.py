"""Run one benchmark scenario against servers it starts itself; print ONE JSON line.

    python bench/run.py fanout      [--server classic,lanchat] [--repeat 3] [--mode text|json]
    python bench/run.py latency | scale | slowconsumer | idle | cli | discovery

Each server is started fresh on 127.0.0.1 port 0 for every repetition (``bench/servers.py``),
the scenario runs ``--repeat`` times, and the line holds every run, the median of each key
figure, and its ratio to the classic baseline measured in the same invocation (ratios hold on
a noisy machine where absolute figures do not).  Everything is loopback-only and bounded in
count and time.  See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import servers

Result = dict[str, Any]

#: The figure each scenario is judged by, and whether bigger is better.
PRIMARY: dict[str, tuple[str, bool]] = {
    "fanout": ("deliveries_per_s", True),
    "latency": ("p99_ms", False),
    "scale": ("p99_ms", False),
    "slowconsumer": ("others_min_ratio", True),
    "idle": ("cpu_pct", False),
    "cli": ("send_median_ms", False),
    "discovery": ("linked_s", False),
}


def _measure(srv: servers.Server, spec: loadgen.LoadSpec) -> tuple[Result, Result]:
    """Connect, run, and return (merged generator report, resource figures)."""
    fleet = loadgen.Fleet(spec)
    try:
        ready = fleet.connect()
        rss_connected = servers.rss_mib(srv.pid)
        st = servers.status(srv.pid)
        cpu0, mach0, t0 = servers.cpu_s(srv.pid), servers.machine_cpu_s(), time.monotonic()
        rep = fleet.run()
        wall = time.monotonic() - t0
        cpu1, mach1 = servers.cpu_s(srv.pid), servers.machine_cpu_s()
        res = {
            "ready": ready,
            "connect_s": round(fleet.connect_s, 3),
            "server_rss_mib_connected": rss_connected,
            "server_rss_mib_end": servers.rss_mib(srv.pid),
            "server_threads": st.get("Threads"),
            "server_cpu_s": round(cpu1 - cpu0, 3),
            "gen_cpu_s": round(rep["gen_cpu_s"], 3),
            "machine_busy_cpu_s": round(mach1 - mach0, 3),
            "wall_s": round(wall, 3),
        }
        return rep, res
    finally:
        fleet.close()


def _clients(n: int, senders: int, extra: list[loadgen.ClientSpec] | None = None,
             slow: int = 0) -> list[loadgen.ClientSpec]:
    out = []
    for i in range(n):
        role = "slow" if i >= n - slow else ("send" if i < senders else "recv")
        out.append(loadgen.ClientSpec(i, role))
    return out + (extra or [])


def _quality(rep: Result) -> Result:
    return {k: rep[k] for k in ("sent", "skipped", "expected_deliveries", "deliveries", "lost",
                                "dups", "reorders", "self_echoes", "close_reasons", "errors",
                                "notices")}


def sc_fanout(srv: servers.Server, a: argparse.Namespace) -> Result:
    spec = loadgen.LoadSpec("127.0.0.1", srv.port, a.mode, _clients(a.clients, a.senders),
                            msgs_per_sender=a.messages, window=a.window, pad=a.pad,
                            workers=a.workers, max_run_s=a.max_run_s, latency_every=16)
    rep, res = _measure(srv, spec)
    lat = rep["last_delivery_s"]
    return {"deliveries_per_s": round(rep["deliveries"] / lat) if lat > 0 else 0,
            "last_delivery_s": round(lat, 3), **res, **_quality(rep),
            "latency_ms": rep["latency_ms"]}


def _latency_spec(srv: servers.Server, a: argparse.Namespace,
                  extra: list[loadgen.ClientSpec] | None = None) -> loadgen.LoadSpec:
    rate_each = a.rate / a.senders
    return loadgen.LoadSpec(
        "127.0.0.1", srv.port, a.mode, _clients(a.clients, a.senders, extra),
        msgs_per_sender=int(rate_each * a.duration) + 2, rate_per_sender=rate_each,
        pad=a.pad, workers=a.workers, duration_s=a.duration, drain_s=3.0,
        max_run_s=a.duration + 10, connect_timeout_s=120)


def _lat_figures(rep: Result) -> Result:
    lat = rep["latency_ms"]
    return {"p50_ms": round(lat["p50"], 3), "p90_ms": round(lat["p90"], 3),
            "p99_ms": round(lat["p99"], 3), "max_ms": round(lat["max"], 3),
            "samples": lat["n"], "gen_max_send_lag_ms": round(rep["gen_max_send_lag_ms"], 3)}


def sc_latency(srv: servers.Server, a: argparse.Namespace) -> Result:
    rep, res = _measure(srv, _latency_spec(srv, a))
    return {**_lat_figures(rep), **res, **_quality(rep)}


def sc_scale(srv: servers.Server, a: argparse.Namespace) -> Result:
    base = a.clients
    idle = [loadgen.ClientSpec(base + i, "idle", f"idle-{i // 50}") for i in range(a.idle)]
    rep, res = _measure(srv, _latency_spec(srv, a, idle))
    return {"idle_wanted": a.idle, "all_connected": res["ready"] == base + a.idle,
            **_lat_figures(rep), **res, **_quality(rep)}


def sc_slowconsumer(srv: servers.Server, a: argparse.Namespace) -> Result:
    rate_each = a.rate / a.senders
    spec = loadgen.LoadSpec(
        "127.0.0.1", srv.port, a.mode, _clients(a.clients, a.senders, slow=1),
        msgs_per_sender=int(rate_each * a.duration) + 2, rate_per_sender=rate_each,
        pad=a.pad, workers=a.workers, duration_s=a.duration, drain_s=3.0,
        max_run_s=a.duration + 10)
    rep, res = _measure(srv, spec)
    tl = [t for t in rep["timeline"] if t["s"] < a.duration]
    ratios = [round(t["delivered"] / t["offered"], 3) if t["offered"] else None for t in tl]
    full = [r for r in ratios[1:] if r is not None]  # second 0 includes the ramp
    return {"others_min_ratio": min(full) if full else 0.0,
            "others_total_ratio": round(rep["deliveries"] / max(1, rep["expected_deliveries"]), 4),
            "per_second_ratio": ratios, "slow": rep["slow"], **res, **_quality(rep),
            **_lat_figures(rep)}


def sc_idle(srv: servers.Server, a: argparse.Namespace) -> Result:
    time.sleep(2.0)  # let start-up settle
    c0, t0 = servers.cpu_s(srv.pid), time.monotonic()
    time.sleep(a.duration)
    c1, t1 = servers.cpu_s(srv.pid), time.monotonic()
    st = servers.status(srv.pid)
    return {"cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 3),
            "rss_mib": round(st.get("VmRSS", 0) / 1024, 1), "threads": st.get("Threads"),
            "duration_s": round(t1 - t0, 1)}


def _cli(srv: servers.Server, *args: str, **kw: Any) -> list[str]:
    return [sys.executable, "-m", "lanchat", "--socket", str(srv.socket_path), *args]


def sc_cli(srv: servers.Server, a: argparse.Namespace) -> Result:
    if srv.kind != "lanchat" or not servers.lanchat_cli_available():
        return {"available": False, "why": "needs lanchatd and the lanchat CLI"}
    env = servers._env()
    times = []
    for i in range(a.runs):
        t = time.monotonic()
        p = subprocess.run(_cli(srv, "send", f"bench {i}"), env=env, capture_output=True,
                           timeout=30, check=False)
        times.append((time.monotonic() - t) * 1000)
        if p.returncode != 0:
            return {"available": False, "why": p.stderr.decode("utf-8", "replace")[-300:]}
    # tail: start it with history present, time to its first line (start-up + backlog)
    t = time.monotonic()
    tail = subprocess.Popen(_cli(srv, "tail"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert tail.stdout is not None
        first = tail.stdout.readline()
        first_ms = (time.monotonic() - t) * 1000 if first else None
        # live: a send's text, time until tail prints it
        marker = f"live-{os.getpid()}-{time.monotonic_ns()}"
        t = time.monotonic()
        subprocess.run(_cli(srv, "send", marker), env=env, capture_output=True, timeout=30,
                       check=False)
        live_ms = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = tail.stdout.readline()
            if not line:
                break
            if marker.encode() in line:
                live_ms = (time.monotonic() - t) * 1000
                break
    finally:
        tail.terminate()
        tail.wait(5)
    return {"send_median_ms": round(statistics.median(times), 1),
            "send_min_ms": round(min(times), 1), "send_max_ms": round(max(times), 1),
            "tail_first_line_ms": round(first_ms, 1) if first_ms else None,
            "tail_live_send_to_print_ms": round(live_ms, 1) if live_ms else None}


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def _peers(sock: str) -> list[dict[str, Any]]:
    p = subprocess.run([sys.executable, "-m", "lanchat", "--socket", sock, "peers", "--json"],
                       capture_output=True, timeout=10, env=servers._env(), check=False)
    try:
        val = json.loads(p.stdout or b"[]")
    except ValueError:
        return []
    return val if isinstance(val, list) else []


def _linked(sock: str) -> bool:
    return any(isinstance(x, dict) and x.get("state") == "linked" for x in _peers(sock))


def sc_discovery(srv: servers.Server | None, a: argparse.Namespace) -> Result:
    """Two daemons on a private bridge in network namespaces (DESIGN.md, "Testing on a real
    network, safely"): mDNS never touches this machine's own interfaces."""
    daemon = servers.REPO / "lanchat" / "daemon.py"
    disc = servers.REPO / "lanchat" / "discovery.py"
    if not (daemon.exists() and disc.exists() and servers.lanchat_cli_available()):
        return {"available": False,
                "why": "not available yet: needs lanchat/daemon.py, discovery.py and the CLI"}
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return {"available": False, "why": "needs root and iproute2 for network namespaces"}
    tag = f"lcb{os.getpid() % 100000}"
    sw, hosts = f"{tag}s", [f"{tag}h1", f"{tag}h2"]
    tmp = tempfile.mkdtemp(prefix="lcd", dir="/tmp")
    procs: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    try:
        _sh("ip", "netns", "add", sw)
        made.append(sw)
        _sh("ip", "netns", "exec", sw, "ip", "link", "add", "br0", "type", "bridge")
        _sh("ip", "netns", "exec", sw, "ip", "link", "set", "br0", "up")
        for i, h in enumerate(hosts, 1):
            _sh("ip", "netns", "add", h)
            made.append(h)
            veth = f"{tag}v{i}"[-15:]
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h)
            _sh("ip", "link", "set", veth, "netns", sw)
            _sh("ip", "netns", "exec", sw, "ip", "link", "set", veth, "master", "br0", "up")
            _sh("ip", "netns", "exec", h, "ip", "addr", "add", f"10.77.0.{i}/24", "dev", "eth0")
            _sh("ip", "netns", "exec", h, "ip", "link", "set", "eth0", "up")
            _sh("ip", "netns", "exec", h, "ip", "link", "set", "lo", "up")
        socks = [os.path.join(tmp, f"h{i}.sock") for i in (1, 2)]

        def launch(i: int) -> subprocess.Popen[bytes]:
            d = os.path.join(tmp, f"s{i}")
            os.makedirs(d, exist_ok=True)
            p = subprocess.Popen(
                ["ip", "netns", "exec", hosts[i], sys.executable, "-c",
                 "import sys; from lanchat.daemon import main; sys.exit(main())",
                 "--port", "0", "--nick", f"h{i + 1}", "--state-dir", d, "--socket", socks[i]],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=servers._env())
            procs.append(p)
            return p

        launch(0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not os.path.exists(socks[0]):
            time.sleep(0.05)
        time.sleep(1.0)  # first daemon settled and advertising
        t = time.monotonic()
        second = launch(1)
        linked_s = None
        while time.monotonic() - t < 30:
            if os.path.exists(socks[1]) and _linked(socks[0]) and _linked(socks[1]):
                linked_s = time.monotonic() - t
                break
            time.sleep(0.05)
        lost_s = None
        if linked_s is not None:
            second.kill()  # SIGKILL: no goodbye, no FIN from a clean close of the daemon
            t = time.monotonic()
            while time.monotonic() - t < 60:
                if not _linked(socks[0]):
                    lost_s = time.monotonic() - t
                    break
                time.sleep(0.1)
        return {"available": True,
                "linked_s": round(linked_s, 3) if linked_s is not None else None,
                "lost_s": round(lost_s, 3) if lost_s is not None else None}
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20,
                           check=False)
        shutil.rmtree(tmp, ignore_errors=True)


SCENARIOS: dict[str, Callable[..., Result]] = {
    "fanout": sc_fanout, "latency": sc_latency, "scale": sc_scale,
    "slowconsumer": sc_slowconsumer, "idle": sc_idle, "cli": sc_cli,
}


def _median_figures(runs: list[Result]) -> Result:
    out: Result = {}
    for k, v in runs[0].items():
        vals = [r.get(k) for r in runs]
        nums = [float(x) for x in vals if isinstance(x, (int, float))]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and len(nums) == len(vals):
            out[k] = round(statistics.median(nums), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="lanchat benchmarks (loopback only)")
    ap.add_argument("scenario", choices=[*SCENARIOS, "discovery"])
    ap.add_argument("--server", default=None,
                    help="comma list: classic, lanchat, or a command with {port} "
                         "(default: classic plus lanchat when it exists)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mode", choices=["text", "json"], default="text",
                    help="wire mode for servers that speak both (classic: always text)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--senders", type=int, default=None)
    ap.add_argument("--messages", type=int, default=2000, help="fanout: per sender")
    ap.add_argument("--window", type=int, default=64, help="fanout: in flight per sender")
    ap.add_argument("--rate", type=float, default=None, help="messages/s offered in total")
    ap.add_argument("--duration", type=float, default=None, help="seconds of sending/idling")
    ap.add_argument("--pad", type=int, default=None, help="payload padding bytes")
    ap.add_argument("--idle", type=int, default=5000, help="scale: idle connections")
    ap.add_argument("--runs", type=int, default=20, help="cli: lanchat send runs")
    ap.add_argument("--max-run-s", type=float, default=120.0)
    a = ap.parse_args(argv)
    table: dict[str, dict[str, Any]] = {
        "fanout": dict(clients=100, senders=10, pad=16),
        "latency": dict(clients=100, senders=100, rate=1000.0, duration=10.0, pad=16),
        "scale": dict(clients=100, senders=100, rate=1000.0, duration=10.0, pad=16),
        "slowconsumer": dict(clients=20, senders=4, rate=500.0, duration=20.0, pad=2000),
        "idle": dict(duration=60.0),
        "cli": {}, "discovery": {},
    }
    defaults = table[a.scenario]
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    loadgen.raise_nofile()
    # SIGTERM (e.g. from timeout(1)) unwinds through the finally blocks, so servers, daemons
    # and network namespaces this run made are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.scenario == "discovery":
        druns = [sc_discovery(None, a)]
        while druns[-1].get("available") and len(druns) < a.repeat:
            druns.append(sc_discovery(None, a))
        line = {"scenario": "discovery", "available": bool(druns[0].get("available")),
                "median": _median_figures(druns) if druns[0].get("available") else {},
                "runs": druns}
        sys.stdout.write(json.dumps(line) + "\n")
        return 0
    kinds = (a.server.split(",") if a.server else
             ["classic", *(["lanchat"] if servers.lanchatd_available() else [])])
    if a.scenario == "cli":
        kinds = [k for k in kinds if k != "classic"] or ["lanchat"]
    fn = SCENARIOS[a.scenario]
    out: Result = {"scenario": a.scenario, "params": {
        k: v for k, v in vars(a).items() if k not in ("scenario", "server") and v is not None},
        "results": {}}
    for kind in kinds:
        runs: list[Result] = []
        for _ in range(a.repeat):
            try:
                srv = servers.start(kind)
            except RuntimeError as exc:
                runs.append({"available": False, "why": str(exc)})
                break
            try:
                saved_mode = a.mode
                if "json" not in srv.modes:
                    a.mode = "text"
                runs.append(fn(srv, a))
                a.mode = saved_mode
            finally:
                srv.stop()
        name = re.sub(r"\s.*", "", kind)
        out["results"][name] = {"median": _median_figures(runs) if runs else {}, "runs": runs}
    metric, _bigger = PRIMARY[a.scenario]
    base = out["results"].get("classic", {}).get("median", {})
    ratios: Result = {}
    for name, r in out["results"].items():
        if name != "classic" and base.get(metric) and metric in r["median"]:
            ratios[name] = round(r["median"][metric] / base[metric], 3)
    out["ratio_to_classic"] = {"metric": metric, **ratios}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    tempfile.tempdir = "/tmp"
    raise SystemExit(main())
