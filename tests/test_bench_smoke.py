"""Smoke run of the benchmark kit against the classic baseline server, the floor and ngircd.

Keeps ``bench/`` from rotting: a tiny fan-out (5 clients x 50 messages) and a tiny rate run go
through the real generator, real worker processes and a real server on 127.0.0.1, print one
JSON line, and every message reaches every other client exactly once, in order.  ngircd
(Debian package ``ngircd``, which ``scripts/test`` installs) is the C reference server; without
it its test skips, or fails under ``$CI``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"

pytestmark = pytest.mark.timeout(60)


def _run(*args: str) -> dict[str, object]:
    p = subprocess.run([sys.executable, str(RUN), *args], capture_output=True, timeout=45,
                       check=False)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 1, lines  # exactly one JSON line per scenario
    out: dict[str, object] = json.loads(lines[0])
    return out


def test_fanout_smoke_no_loss_no_dup() -> None:
    out = _run("fanout", "--server", "classic", "--repeat", "1", "--clients", "5",
               "--senders", "5", "--messages", "50", "--window", "8")
    assert out["scenario"] == "fanout"
    run = out["results"]["classic"]["runs"][0]  # type: ignore[index]
    assert run["ready"] == 5
    assert run["sent"] == 250
    assert run["expected_deliveries"] == 250 * 4  # nobody gets their own message in text mode
    assert run["deliveries"] == 1000
    assert (run["lost"], run["dups"], run["reorders"]) == (0, 0, 0)
    assert run["deliveries_per_s"] > 0
    assert run["gen_cpu_s"] >= 0


def test_latency_smoke_rate_mode() -> None:
    out = _run("latency", "--server", "classic,floor", "--repeat", "1", "--clients", "4",
               "--senders", "2", "--rate", "100", "--duration", "1")
    for name in ("classic", "floor"):
        run = out["results"][name]["runs"][0]  # type: ignore[index]
        assert run["lost"] == 0 and run["dups"] == 0, (name, run)
        assert run["samples"] == run["deliveries"] > 0
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
        # the kernel's receive timestamp comes before the generator reads the bytes
        assert 0 < run["net_p50_ms"] <= run["p50_ms"] and run["net_max_ms"] <= run["max_ms"]
        assert run["clock_drift_us"] < 1000
    params = out["params"]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:  # --pin auto: a latency scenario keeps server and generator apart
        assert params["server_cpus"] == cpus[:1] and params["gen_cpus"] == cpus[1:], params
    else:
        assert params.get("server_cpus") is None, params


def test_ngircd_reference_speaks_irc() -> None:
    """The generator's IRC mode against ngircd: registration, JOIN, every PRIVMSG delivered."""
    require_tool("ngircd", "ngircd", "/usr/sbin/ngircd")
    out = _run("fanout", "--server", "ngircd", "--repeat", "1", "--clients", "5",
               "--senders", "5", "--messages", "50", "--window", "8")
    run = out["results"]["ngircd"]["runs"][0]  # type: ignore[index]
    assert run["ready"] == 5, run
    assert run["deliveries"] == run["expected_deliveries"] == 1000
    assert (run["lost"], run["dups"], run["reorders"]) == (0, 0, 0)


def test_feed_bench_smoke() -> None:
    """bench/feed.py (signed feeds, pure CPU) runs small and reports sane figures."""
    p = subprocess.run([sys.executable, str(RUN.parent / "feed.py"), "--messages", "640",
                        "--repeat", "1", "--json"], capture_output=True, timeout=45, check=False)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    r = json.loads(lines[0])["results"]
    assert r["runs"] == 10  # 640 entries in runs of 64
    assert r["sign_us"] > 0 and r["verify_us"] > 0
    # one signature per run of 64 against one per entry: far cheaper, whatever the machine
    assert r["verify_run64_us"] * 8 < r["verify_each_us"]
    assert r["append_batch64_us"] < r["append_batch1_us"]
    assert r["catchup_projected_each_per_s"] < r["catchup_projected_per_s"]


def test_mesh_bench_smoke() -> None:
    """bench/mesh.py: a 2- and a 3-daemon mesh, every message everywhere once, one copy."""
    p = subprocess.run([sys.executable, str(RUN.parent / "mesh.py"), "--sizes", "2,3",
                        "--messages", "20", "--rate", "50"], capture_output=True, timeout=55,
                       check=False)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    two, three = json.loads(lines[0])["runs"]
    assert two["copies_per_daemon"] == [1.0]  # the calibration: one copy by definition
    assert two["delivered_min"] == three["delivered_min"] == 20
    # lanchat.relay: in a full mesh each daemon takes in one copy (flooding: 1.6-1.8 here),
    # and none goes back to the origin
    assert all(0.9 <= c <= 1.2 for c in three["copies_per_daemon"]), three
    assert three["copies_origin"] <= 0.1, three
    assert not two["link_sockets_changed"] and not three["link_sockets_changed"]


def test_probes_are_read_at_once_the_rest_in_batches() -> None:
    """--probes 2 of 12: latency is sampled from the 2 probes only, the other 10 measured
    clients are read in batches and still count every delivery; the generator's CPU and the
    server's CPU per delivery are reported."""
    out: Any = _run("latency", "--server", "classic", "--repeat", "1", "--clients", "12",
               "--senders", "12", "--rate", "120", "--duration", "1", "--probes", "2")
    run = out["results"]["classic"]["runs"][0]
    assert run["gen_batched_clients"] == 10, run
    assert (run["lost"], run["dups"]) == (0, 0), run
    assert run["deliveries"] == run["expected_deliveries"] > 0
    assert run["samples"] * 6 == run["deliveries"]  # 2 of the 12 receivers sample
    assert run["gen_cpu_s"] > 0 and run["gen_cpu_pct"] > 0
    assert run["all_deliveries"] == run["deliveries"]
    assert run["server_cpu_us_per_delivery"] == pytest.approx(
        1e6 * run["server_cpu_s"] / run["deliveries"], rel=0.01, abs=0.002)


def _bigroom(server: str) -> dict[str, Any]:
    out: Any = _run("bigroom", "--server", server, "--repeat", "1", "--clients", "6",
                    "--senders", "2", "--idle", "60", "--rate", "20", "--duration", "1")
    return {name: r["runs"][0] for name, r in out["results"].items()}


def _check_bigroom(name: str, r: dict[str, Any]) -> None:
    assert r["connected"] == r["members_wanted"] == 66 and r["cut"] == 0, (name, r)
    # the probe reached every member, the sender included
    assert r["probe_held"] == r["probe_reached"] == 66, (name, r)
    assert r["probe_all_s"] is not None and 0 <= r["probe_all_s"] < 5, (name, r)
    assert (r["lost"], r["dups"]) == (0, 0), (name, r)
    # the 60 members who only listen got every message too, and count as deliveries
    assert r["all_deliveries"] == r["deliveries"] + 60 * r["sent"], (name, r)
    assert 0 < r["p50_ms"] <= r["p99_ms"], (name, r)
    assert r["server_cpu_us_per_delivery"] > 0 and r["gen_cpu_pct"] is not None, (name, r)


def test_bigroom_smoke() -> None:
    """The big-room scenario, small: every member stays in the one room and hears everything."""
    for name, run in _bigroom("classic,floor").items():
        _check_bigroom(name, run)


def test_bigroom_ngircd() -> None:
    """The big room on ngircd: every member JOINs #lobby."""
    require_tool("ngircd", "ngircd", "/usr/sbin/ngircd")
    _check_bigroom("ngircd", _bigroom("ngircd")["ngircd"])


def test_tls_bench_smoke() -> None:
    """bench/tls.py (issue 14's building blocks, pure CPU) runs small, figures are sane."""
    p = subprocess.run([sys.executable, str(RUN.parent / "tls.py"), "--messages", "640",
                        "--handshakes", "3", "--repeat", "1", "--json"],
                       capture_output=True, timeout=45, check=False)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    r = json.loads(lines[0])["results"]
    assert r["handshake_ms"] > 0 and r["link_proof_us"] > 0 and r["open_us"] > 0
    # a record per frame costs more than frames batched in one write, whatever the machine
    assert r["tls_us_per_msg"] < r["tls_us_per_single"]
    assert "OpenSSL" in r["openssl"]


def test_catchup_smoke_every_message_arrives() -> None:
    """bench/catchup.py: a newcomer takes in a peer's (signed) history over a real link; with
    a baseline (here the same checkout) each of its runs is paired with the one beside it."""
    p = subprocess.run([sys.executable, str(RUN.parent / "catchup.py"), "--messages", "300",
                        "--repeat", "1", "--max-run-s", "30", "--baseline",
                        str(RUN.parent.parent)], capture_output=True, timeout=55, check=False)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    out = json.loads(lines[0])
    (run,) = out["this"]["runs"]
    assert out["scenario"] == "catchup" and run["held"] == 300, out
    assert run["per_s"] > 0 and run["receiver_cpu_s"] > 0
    base = out["baseline"]
    assert base["runs"][0]["held"] == 300
    assert base["paired_ratios"] == [round(run["per_s"] / base["runs"][0]["per_s"], 3)]
    assert base["median_paired_ratio"] == base["paired_ratios"][0]


@pytest.mark.timeout(120)  # three invocations, one of them four runs
def test_clients_over_tls_against_floor_lose_nothing() -> None:
    """--tls both: every client of the TLS runs speaks TLS 1.3 (the floor server's --tls, the
    hub's kind of certificate), runs alternate with plain ones, nothing is lost either way,
    and tls_vs_plain compares the two; a server without TLS is said so, not run in clear."""
    out: Any = _run("latency", "--server", "floor", "--tls", "both", "--repeat", "2",
                    "--clients", "4", "--senders", "2", "--rate", "100", "--duration", "1")
    res = out["results"]
    assert set(res) == {"floor", "floor+tls"}, res.keys()
    assert out["params"]["tls"] == "both"
    for plain, tls in zip(res["floor"]["runs"], res["floor+tls"]["runs"], strict=True):
        assert plain["tls"] is None
        # the sessions themselves say TLS 1.3, all 4 held to the end (never silently plain)
        assert tls["tls"] and tls["tls"]["version"] == "TLSv1.3", tls
        assert tls["tls"]["sessions"] == 4 and tls["tls"]["cipher"].startswith("TLS_"), tls
        for run in (plain, tls):
            assert run["ready"] == 4 and run["cut"] == 0, run
            assert run["deliveries"] == run["expected_deliveries"] > 0, run
            assert (run["lost"], run["dups"]) == (0, 0), run
            assert 0 < run["net_p50_ms"] <= run["p50_ms"] <= run["p99_ms"], run
    cmp = out["tls_vs_plain"]
    assert set(cmp) == {"floor"} and cmp["floor"]["metric"] == "p99_ms", cmp
    assert cmp["floor"]["ratios"]["p99_ms"] == pytest.approx(
        res["floor+tls"]["median"]["p99_ms"] / res["floor"]["median"]["p99_ms"], abs=0.002)
    assert isinstance(cmp["floor"]["cost_pct"], float)
    # a server without TLS: said so, never measured in clear under the +tls name
    out = _run("latency", "--server", "classic", "--tls", "--repeat", "2")
    (refused,) = out["results"]["classic+tls"]["runs"]
    assert refused["available"] is False and "no TLS" in refused["why"], refused
    # window mode over TLS: pipelined writes, several records per read, all in order
    out = _run("fanout", "--server", "floor", "--tls", "--repeat", "1", "--clients", "5",
               "--senders", "5", "--messages", "200", "--window", "32")
    run = out["results"]["floor+tls"]["runs"][0]
    assert run["tls"] and run["tls"]["version"] == "TLSv1.3", run
    assert run["tls"]["sessions"] == 5, run
    assert run["deliveries"] == run["expected_deliveries"] == 200 * 5 * 4, run
    assert (run["lost"], run["dups"], run["reorders"]) == (0, 0, 0), run


def test_tls_vs_plain_says_why_when_no_tls_session() -> None:
    """A hub that answers a ClientHello in clear (lanchat before issue 14) fails every TLS
    client at once; tls_vs_plain then gives no cost (never NaN ratios) and says why."""
    sys.path.insert(0, str(RUN.parent))
    import run as bench_run

    plain = {"median": {"p99_ms": 2.0}, "runs": [{"p99_ms": 2.0, "tls": None}]}
    failed = {"median": {"p99_ms": float("nan"), "ready": 0.0},
              "runs": [{"p99_ms": float("nan"), "ready": 0, "tls": None,
                        "close_reasons": {"tls handshake: WRONG_VERSION_NUMBER": 4}}]}
    good = {"median": {"p99_ms": 2.2}, "runs": [{"p99_ms": 2.2, "tls": {"version": "TLSv1.3"}}]}
    out = bench_run._tls_vs_plain({"a": plain, "a+tls": failed, "b": plain, "b+tls": good},
                                  "p99_ms", False)
    assert out["a"]["cost_pct"] is None and "no TLS session" in out["a"]["why"], out
    assert out["b"] == {"metric": "p99_ms", "cost_pct": 10.0, "ratios": {"p99_ms": 1.1}}, out
