"""Run one benchmark scenario against servers it starts itself; print ONE JSON line.

    python bench/run.py fanout      [--server classic,lanchat] [--repeat 3] [--mode text|json]
    python bench/run.py latency | scale | bigroom | slowconsumer | idle | cli | discovery
    python bench/run.py latency --server lanchat --tls both   # TLS vs plain, runs alternating

Each server is started fresh on 127.0.0.1 port 0 for every repetition (``bench/servers.py``),
the scenario runs ``--repeat`` times, and the line holds every run, the median of each key
figure, and its ratio to the classic baseline measured in the same invocation (ratios hold on
a noisy machine where absolute figures do not).  Everything is loopback-only and bounded in
count and time.  See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
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

#: Scenarios that offer a fixed load and measure latency: with --pin auto the server and the
#: generator run on different cores there (the generator needs less than one core for them).
#: Throughput scenarios are not pinned: there the generator needs every core it can get.
PINNED_BY_DEFAULT = ("latency", "scale", "bigroom", "slowconsumer")

#: The figure each scenario is judged by, and whether bigger is better.
PRIMARY: dict[str, tuple[str, bool]] = {
    "fanout": ("deliveries_per_s", True),
    "latency": ("p99_ms", False),
    "scale": ("p99_ms", False),
    "bigroom": ("p99_ms", False),
    "slowconsumer": ("others_min_ratio", True),
    "idle": ("cpu_pct", False),
    "cli": ("send_median_ms", False),
    "discovery": ("linked_s", False),
}


def _loadavg() -> float:
    """The machine's 1-minute load average (/proc/loadavg)."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def _busy_pct(sample_s: float = 1.0) -> float:
    """Percent of the machine's CPU (all cores) busy over the next ``sample_s`` seconds."""
    m0, t0 = servers.machine_cpu_s(), time.monotonic()
    time.sleep(sample_s)
    m1, t1 = servers.machine_cpu_s(), time.monotonic()
    return 100 * (m1 - m0) / ((t1 - t0) * (os.cpu_count() or 1))


def _wait_quiet(max_s: float, below_pct: float) -> Result:
    """Wait (at most ``max_s``) until the machine is less than ``below_pct`` busy over one
    second: the machine is shared, and a run beside someone else's load measures both."""
    t0 = time.monotonic()
    busy = _busy_pct()
    while busy >= below_pct and time.monotonic() - t0 < max_s:
        busy = _busy_pct()
    return {"busy_before_pct": round(busy, 1), "quiet_wait_s": round(time.monotonic() - t0, 1),
            "loadavg_1m_before": _loadavg()}


def _measure(srv: servers.Server, spec: loadgen.LoadSpec,
             room_probe_s: float = 0.0) -> tuple[Result, Result]:
    """Connect, (with ``room_probe_s``) send one message to the room and see who gets it
    within that time, run, and return (merged generator report, resource figures).

    ``server_cpu_us_per_delivery``: the server's CPU over the run divided by every delivery
    the generator counted (measured receivers, plus idle members of the room); ``gen_cpu_pct``:
    the generator workers' CPU over the run in % of one core."""
    fleet = loadgen.Fleet(spec)
    try:
        srv_cpu_before_connect = servers.cpu_s(srv.pid)
        ready = fleet.connect()
        connect_cpu = servers.cpu_s(srv.pid) - srv_cpu_before_connect
        probe = fleet.room_probe(room_probe_s) if room_probe_s > 0 else {}
        rss_connected = servers.rss_mib(srv.pid)
        st = servers.status(srv.pid)
        cpu0, mach0, t0 = servers.cpu_s(srv.pid), servers.machine_cpu_s(), time.monotonic()
        rep = fleet.run()
        wall = time.monotonic() - t0
        cpu1, mach1 = servers.cpu_s(srv.pid), servers.machine_cpu_s()
        all_deliveries = rep["deliveries"] + rep["idle_deliveries"]
        res = {
            "ready": ready,
            "cut": ready - rep["ready_end"],
            **probe,
            "connect_s": round(fleet.connect_s, 3),
            "server_connect_cpu_s": round(connect_cpu, 3),
            "gen_connect_cpu_s": round(fleet.connect_cpu_s, 3),
            "server_rss_mib_connected": rss_connected,
            "server_rss_mib_end": servers.rss_mib(srv.pid),
            "server_threads": st.get("Threads"),
            "server_cpu_s": round(cpu1 - cpu0, 3),
            "server_cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1) if wall > 0 else None,
            "all_deliveries": all_deliveries,
            "server_cpu_us_per_delivery": (round(1e6 * (cpu1 - cpu0) / all_deliveries, 3)
                                           if all_deliveries else None),
            "gen_cpu_s": round(rep["gen_cpu_s"], 3),
            "gen_cpu_pct": round(100 * rep["gen_cpu_s"] / wall, 1) if wall > 0 else None,
            "gen_batched_clients": rep["batched_clients"],
            # the TLS the clients spoke ({version, cipher, sessions} held at the end), or None
            "tls": rep["tls"],
            "machine_busy_cpu_s": round(mach1 - mach0, 3),
            # busy CPU of everything but this server and the generator's workers (other
            # people's work on a shared machine, plus our coordinator): how quiet the run was
            "other_busy_cpu_s": round((mach1 - mach0) - (cpu1 - cpu0) - rep["gen_cpu_s"], 3),
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
                            workers=a.workers, max_run_s=a.max_run_s, latency_every=16,
                            cpus=a.gen_cpus, probes=a.probes, batch_ms=a.batch_ms,
                            tls=a.tls_on)
    rep, res = _measure(srv, spec)
    lat = rep["last_delivery_s"]
    return {"deliveries_per_s": round(rep["deliveries"] / lat) if lat > 0 else 0,
            "last_delivery_s": round(lat, 3), **res, **_quality(rep),
            "latency_ms": rep["latency_ms"]}


def _latency_spec(srv: servers.Server, a: argparse.Namespace,
                  extra: list[loadgen.ClientSpec] | None = None,
                  connect_timeout_s: float = 120) -> loadgen.LoadSpec:
    rate_each = a.rate / a.senders
    return loadgen.LoadSpec(
        "127.0.0.1", srv.port, a.mode, _clients(a.clients, a.senders, extra),
        msgs_per_sender=int(rate_each * a.duration) + 2, rate_per_sender=rate_each,
        pad=a.pad, workers=a.workers, duration_s=a.duration, drain_s=3.0,
        max_run_s=a.duration + 10, connect_timeout_s=connect_timeout_s, cpus=a.gen_cpus,
        probes=a.probes, batch_ms=a.batch_ms, tls=a.tls_on)


def _lat_figures(rep: Result) -> Result:
    """Latency until the client read it (``p*_ms``) and until it reached its socket (``net_*``)."""
    lat, net = rep["latency_ms"], rep["net_latency_ms"]
    return {"p50_ms": round(lat["p50"], 3), "p90_ms": round(lat["p90"], 3),
            "p99_ms": round(lat["p99"], 3), "max_ms": round(lat["max"], 3),
            "net_p50_ms": round(net["p50"], 3), "net_p90_ms": round(net["p90"], 3),
            "net_p99_ms": round(net["p99"], 3), "net_max_ms": round(net["max"], 3),
            "samples": lat["n"], "gen_max_send_lag_ms": round(rep["gen_max_send_lag_ms"], 3),
            "clock_drift_us": round(rep["clock_drift_us"], 1)}


def sc_latency(srv: servers.Server, a: argparse.Namespace) -> Result:
    rep, res = _measure(srv, _latency_spec(srv, a))
    return {**_lat_figures(rep), **res, **_quality(rep)}


def sc_scale(srv: servers.Server, a: argparse.Namespace) -> Result:
    base = a.clients
    idle = [loadgen.ClientSpec(base + i, "idle", f"idle-{i // 50}") for i in range(a.idle)]
    rep, res = _measure(srv, _latency_spec(srv, a, idle))
    return {"idle_wanted": a.idle, "all_connected": res["ready"] == base + a.idle,
            **_lat_figures(rep), **res, **_quality(rep)}


#: Big room: seconds the generator waits for everyone to connect and join, and for the one
#: probe message to reach every member.
BIGROOM_CONNECT_S = 90.0
BIGROOM_PROBE_S = 5.0


def sc_bigroom(srv: servers.Server, a: argparse.Namespace) -> Result:
    """``--idle`` members who stay in the room the measured clients chat in (lanchat: the
    default room; ngircd: #lobby; classic and floor: their only room), then one message to
    all of them, then the latency scenario in that room (so every member receives it)."""
    base = a.clients
    members = [loadgen.ClientSpec(base + i, "idle") for i in range(a.idle)]
    spec = _latency_spec(srv, a, members, connect_timeout_s=BIGROOM_CONNECT_S)
    rep, res = _measure(srv, spec, room_probe_s=BIGROOM_PROBE_S)
    return {"members_wanted": base + a.idle, "connected": res["ready"],
            "all_connected": res["ready"] == base + a.idle,
            **_lat_figures(rep), **res, **_quality(rep)}


def sc_slowconsumer(srv: servers.Server, a: argparse.Namespace) -> Result:
    rate_each = a.rate / a.senders
    spec = loadgen.LoadSpec(
        "127.0.0.1", srv.port, a.mode, _clients(a.clients, a.senders, slow=1),
        msgs_per_sender=int(rate_each * a.duration) + 2, rate_per_sender=rate_each,
        pad=a.pad, workers=a.workers, duration_s=a.duration, drain_s=3.0,
        max_run_s=a.duration + 10, cpus=a.gen_cpus, probes=a.probes, batch_ms=a.batch_ms,
        tls=a.tls_on)
    rep, res = _measure(srv, spec)
    tl = [t for t in rep["timeline"] if t["s"] < a.duration]
    ratios = [round(t["delivered"] / t["offered"], 3) if t["offered"] else None for t in tl]
    full = [r for r in ratios[1:] if r is not None]  # second 0 includes the ramp
    slow = rep["slow"]
    # Cut: the server hung up during the run, or the slow client, reading everything after
    # the run, reached EOF (with its receive window full the FIN cannot arrive earlier).
    cut = bool(slow) and all(s["cut_after_s"] is not None or (s["reason"] or "").startswith(
        ("eof", "recv:", "server hung up")) for s in slow)
    notice = bool(slow) and all(any(ln.startswith("! ") or '"error"' in ln
                                    for ln in s["last_lines"]) for s in slow)
    return {"others_min_ratio": min(full) if full else 0.0,
            "others_total_ratio": round(rep["deliveries"] / max(1, rep["expected_deliveries"]), 4),
            "per_second_ratio": ratios, "slow_cut": cut, "slow_got_notice": notice,
            "slow": slow, **res, **_quality(rep),
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


#: The port both daemons of the discovery scenario listen on, as a packaged daemon does.
DISCOVERY_PORT = 7654


def _ns_peers(host: Any, sock: str) -> subprocess.Popen[bytes]:
    """Start ``lanchat --socket SOCK peers --json`` inside ``host``'s namespace."""
    return subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, "-m", "lanchat",
                             "--socket", sock, "peers", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=servers._env())


def _linked_states(polls: list[subprocess.Popen[bytes]]) -> list[bool]:
    """Wait for the ``peers --json`` polls; for each, whether some peer is ``linked``."""
    out = []
    for p in polls:
        try:
            raw, _ = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate(timeout=5)
            raw = b""
        try:
            val = json.loads(raw or b"[]")
        except ValueError:
            val = []
        out.append(_any_linked(val))
    return out


def _any_linked(peers: object) -> bool:
    """Whether a ``peers`` result (RPC or ``--json``) lists a linked peer."""
    return isinstance(peers, list) and any(
        isinstance(x, dict) and x.get("state") == "linked" for x in peers)


def sc_discovery(srv: servers.Server | None, a: argparse.Namespace) -> Result:
    """Two daemons on a private LAN of network namespaces (tests/netns.py; DESIGN.md, "Testing
    on a real network, safely"): mDNS never touches this machine's own interfaces.

    ``linked_s``: from starting the second daemon (process start-up included) until both list
    the other as ``linked`` (control socket polled every 20 ms); ``linked_cli_s``: until
    ``lanchat peers --json``, run inside each namespace, agrees.  ``lost_s``: from SIGKILLing
    the second daemon until the first no longer lists a linked peer.  Then a third daemon
    links (``linked_third_s``) and its cable is pulled: ``lost_unplugged_s`` is how long the
    first takes to notice a peer whose kernel never closes the connection (heartbeat).
    """
    daemon = servers.REPO / "lanchat" / "daemon.py"
    disc = servers.REPO / "lanchat" / "discovery.py"
    if not (daemon.exists() and disc.exists() and servers.lanchat_cli_available()):
        return {"available": False,
                "why": "not available yet: needs lanchat/daemon.py, discovery.py and the CLI"}
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return {"available": False, "why": "needs root and iproute2 for network namespaces"}
    sys.path.insert(0, str(servers.REPO / "tests"))
    # tests/netns.py: builds the namespaces and always tears them down (and our processes)
    netns: Any = importlib.import_module("netns")

    env = servers.lanchatd_env()
    rounds: list[float] = []
    sys.path.insert(0, str(servers.REPO))
    client: Any = importlib.import_module("lanchat.client")
    errors: Any = importlib.import_module("lanchat.errors")

    def rpc_linked(sock: str) -> bool:
        """Whether the daemon at ``sock`` lists a linked peer (control socket: a Unix socket,
        reached through the file system, no network traffic)."""
        try:
            with client.ControlClient(sock, timeout=5.0) as c:
                peers = c.call("peers")
        except (OSError, errors.LanchatError):
            return False
        return _any_linked(peers)

    def poll_until(want_linked: bool, pairs: list[tuple[Any, str]],
                   limit_s: float) -> tuple[float, float] | None:
        """Seconds from now until every (host, socket) shows a linked peer (or, with
        ``want_linked`` false, none), as (fine, cli): ``fine`` polls the control socket every
        20 ms; ``cli`` is the end of the first ``lanchat peers --json`` round, run inside each
        namespace, that agrees (up to one CLI start-up later).  None if not within limit_s."""
        t = time.monotonic()
        fine = None
        while time.monotonic() - t < limit_s:
            if fine is None:
                if all(rpc_linked(s) == want_linked for _h, s in pairs):
                    fine = time.monotonic() - t
                else:
                    time.sleep(0.02)
                    continue
            r0 = time.monotonic()
            ok = _linked_states([_ns_peers(h, s) for h, s in pairs])
            r1 = time.monotonic()
            rounds.append(r1 - r0)
            if all(x == want_linked for x in ok):
                return fine, r1 - t
            time.sleep(0.02)
        return None

    with netns.Lan("lcb") as lan:
        hosts = [lan.add_host(), lan.add_host(), lan.add_host()]
        socks = [str(lan.tmpdir / f"h{i}.sock") for i in (1, 2, 3)]

        def launch(i: int) -> Any:
            d = lan.tmpdir / f"s{i}"
            d.mkdir(exist_ok=True)
            return hosts[i].run(
                [sys.executable, "-m", "lanchat.daemon", "--port", str(DISCOVERY_PORT),
                 "--bind", "0.0.0.0", "--state-dir", str(d), "--socket", socks[i],
                 "--nick", f"h{i + 1}", "--max-rate", "0"], env=env, cwd=str(d))

        first = launch(0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
                os.path.exists(socks[0]) and "listening on" in first.err_text()):
            if first.poll() is not None:
                return {"available": False, "why": first.err_text()[-500:]}
            time.sleep(0.05)
        time.sleep(1.0)  # the first daemon settled and advertising
        out: Result = {"available": True}
        second = launch(1)
        linked = poll_until(True, [(hosts[0], socks[0]), (hosts[1], socks[1])], 30)
        out["linked_s"] = round(linked[0], 3) if linked else None
        out["linked_cli_s"] = round(linked[1], 3) if linked else None
        if linked:
            second.kill()  # SIGKILL; `ip netns exec` exec'd the daemon: this pid is lanchatd
            second.wait(10)
            lost = poll_until(False, [(hosts[0], socks[0])], 30)
            out["lost_s"] = round(lost[0], 3) if lost else None
            out["lost_cli_s"] = round(lost[1], 3) if lost else None
            # A host that vanishes without its kernel closing the connection (cable pulled,
            # power cut): only the link's heartbeat can notice it.
            launch(2)
            relinked = poll_until(True, [(hosts[0], socks[0]), (hosts[2], socks[2])], 30)
            out["linked_third_s"] = round(relinked[0], 3) if relinked else None
            if relinked:
                lan.set_link(hosts[2], netns.DEFAULT_SUBNET, up=False)
                gone = poll_until(False, [(hosts[0], socks[0])], 60)
                out["lost_unplugged_s"] = round(gone[0], 3) if gone else None
                out["lost_unplugged_cli_s"] = round(gone[1], 3) if gone else None
        out["poll_round_s"] = round(statistics.median(rounds), 3) if rounds else None
        if None in out.values():
            out["log_tail"] = first.err_text().splitlines()[-10:]
        return out


SCENARIOS: dict[str, Callable[..., Result]] = {
    "fanout": sc_fanout, "latency": sc_latency, "scale": sc_scale, "bigroom": sc_bigroom,
    "slowconsumer": sc_slowconsumer, "idle": sc_idle, "cli": sc_cli,
}
#: Scenarios whose clients the generator drives, so ``--tls`` applies (idle has no clients;
#: cli uses the control socket, which stays plain).
TLS_SCENARIOS = ("fanout", "latency", "scale", "bigroom", "slowconsumer")
#: Suffix of a server's name in the results when its clients spoke TLS.
TLS_SUFFIX = "+tls"
#: Figures compared TLS / plain in ``tls_vs_plain`` (medians of the same invocation), with
#: whether bigger is better.
TLS_FIGURES: dict[str, bool] = {
    "deliveries_per_s": True, "p50_ms": False, "p90_ms": False, "p99_ms": False,
    "net_p50_ms": False, "net_p99_ms": False, "probe_all_s": False, "connect_s": False,
    "others_min_ratio": True, "server_cpu_us_per_delivery": False, "server_cpu_s": False,
    "gen_cpu_s": False, "gen_cpu_pct": False,
}


def _tls_vs_plain(results: Result, metric: str, bigger: bool) -> Result:
    """Per server run both ways: each figure's TLS median over its plain median, and what TLS
    costs in the scenario's main figure, in % (positive = worse with TLS): 1 - tls/plain when
    bigger is better, tls/plain - 1 when smaller is."""
    out: Result = {}
    for name, r in results.items():
        tls = results.get(name + TLS_SUFFIX)
        if name.endswith(TLS_SUFFIX) or not (tls and tls["median"] and r["median"]):
            continue  # not run both ways (a server without TLS says why in its runs)
        if not all(run.get("tls") for run in tls["runs"]):  # e.g. a hub without TLS yet
            out[name] = {"metric": metric, "cost_pct": None, "ratios": {},
                         "why": "a run with TLS held no TLS session (see its close_reasons)"}
            continue
        plain_m, tls_m = r["median"], tls["median"]
        ratios = {k: round(tls_m[k] / plain_m[k], 3) for k in TLS_FIGURES
                  if plain_m.get(k) and k in tls_m and not math.isnan(tls_m[k] / plain_m[k])}
        cost = None
        if metric in ratios:
            ratio = ratios[metric]
            cost = round(100 * ((1 - ratio) if bigger else (ratio - 1)), 1)
        out[name] = {"metric": metric, "cost_pct": cost, "ratios": ratios}
    return out


def _median_figures(runs: list[Result]) -> Result:
    out: Result = {}
    for k, v in runs[0].items():
        vals = [r.get(k) for r in runs]
        nums = [float(x) for x in vals if isinstance(x, (int, float))]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and len(nums) == len(vals):
            out[k] = round(statistics.median(nums), 3)
    return out


def _cpu_split(pin: str, scenario: str) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(server CPUs, generator CPUs): the first CPU we may use for the server, the rest for
    the generator -- or (None, None), unpinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "off" or len(cpus) < 2 or (pin == "auto" and scenario not in PINNED_BY_DEFAULT):
        return None, None
    return (cpus[0],), tuple(cpus[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="lanchat benchmarks (loopback only)")
    ap.add_argument("scenario", choices=[*SCENARIOS, "discovery"])
    ap.add_argument("--server", default=None,
                    help="comma list: classic, floor, lanchat, ngircd, or a command with {port} "
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
    ap.add_argument("--idle", type=int, default=None,
                    help="scale: idle connections; bigroom: members besides --clients")
    ap.add_argument("--probes", type=int, default=10,
                    help="measured clients read the moment they are readable (latency is "
                         "sampled from them); the rest are read in batches (0: all at once)")
    ap.add_argument("--batch-ms", type=float, default=5.0,
                    help="how often the non-probe measured clients are read")
    ap.add_argument("--runs", type=int, default=20, help="cli: lanchat send runs")
    ap.add_argument("--max-run-s", type=float, default=120.0)
    ap.add_argument("--pin", choices=["auto", "on", "off"], default="auto",
                    help="run the server on the first CPU and the generator on the others "
                         f"(auto: in {', '.join(PINNED_BY_DEFAULT)}, with 2 CPUs or more)")
    ap.add_argument("--quiet-wait", type=float, default=0.0,
                    help="before each run, wait up to this many seconds for a quiet machine")
    ap.add_argument("--quiet-below", type=float, default=15.0,
                    help="quiet = less than this %% of all cores busy over one second")
    ap.add_argument("--tls", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                    help="clients speak TLS 1.3 (on; bare --tls); both: each server plain and "
                         "with TLS, runs alternating, results under NAME and NAME+tls and "
                         "tls_vs_plain (floor and lanchat only)")
    a = ap.parse_args(argv)
    if a.tls != "off" and a.scenario not in TLS_SCENARIOS:
        ap.error(f"--tls applies to {', '.join(TLS_SCENARIOS)}")
    a.tls_on = False
    table: dict[str, dict[str, Any]] = {
        "fanout": dict(clients=100, senders=10, pad=16),
        "latency": dict(clients=100, senders=100, rate=1000.0, duration=10.0, pad=16),
        "scale": dict(clients=100, senders=100, rate=1000.0, duration=10.0, pad=16, idle=5000),
        "bigroom": dict(clients=100, senders=10, rate=20.0, duration=5.0, pad=16, idle=4900),
        "slowconsumer": dict(clients=20, senders=4, rate=500.0, duration=20.0, pad=2000),
        "idle": dict(duration=60.0),
        "cli": {}, "discovery": {},
    }
    defaults = table[a.scenario]
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.server_cpus, a.gen_cpus = _cpu_split(a.pin, a.scenario)
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
        k: v for k, v in vars(a).items()
        if k not in ("scenario", "server", "tls_on") and v is not None}, "results": {}}
    variants = {"off": [False], "on": [True], "both": [False, True]}[a.tls]
    for kind in kinds:
        # with --tls both the two variants alternate run by run, so both see the same
        # machine (a shared one drifts over minutes)
        by_variant: dict[bool, list[Result]] = {v: [] for v in variants}
        for _ in range(a.repeat):
            for tls in variants:
                runs = by_variant[tls]
                if runs and runs[-1].get("available") is False:
                    continue  # this server cannot do this variant: said once
                quiet = (_wait_quiet(a.quiet_wait, a.quiet_below) if a.quiet_wait > 0
                         else {"loadavg_1m_before": _loadavg()})
                try:
                    extra = servers.tls_args(kind) if tls else []
                    srv = servers.start(kind, extra, cpus=a.server_cpus)
                except RuntimeError as exc:
                    runs.append({"available": False, "why": str(exc)})
                    continue
                try:
                    saved_mode = a.mode
                    if a.mode not in srv.modes:  # classic: text only; ngircd: IRC only
                        a.mode = srv.modes[0]
                    a.tls_on = tls
                    runs.append({**fn(srv, a), **quiet})
                    a.mode = saved_mode
                finally:
                    srv.stop()
        name = re.sub(r"\s.*", "", kind)
        for tls, runs in by_variant.items():
            out["results"][name + (TLS_SUFFIX if tls else "")] = {
                "median": _median_figures(runs) if runs else {}, "runs": runs}
    metric, bigger = PRIMARY[a.scenario]
    base = out["results"].get("classic", {}).get("median", {})
    ratios: Result = {}
    for name, r in out["results"].items():
        if name != "classic" and base.get(metric) and metric in r["median"]:
            ratios[name] = round(r["median"][metric] / base[metric], 3)
    out["ratio_to_classic"] = {"metric": metric, **ratios}
    if a.tls == "both":
        out["tls_vs_plain"] = _tls_vs_plain(out["results"], metric, bigger)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    tempfile.tempdir = "/tmp"
    raise SystemExit(main())
