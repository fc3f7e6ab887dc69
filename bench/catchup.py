"""Catch-up over a link: how fast a new daemon takes in a peer's history; print ONE JSON line.

    python bench/catchup.py [--messages 20000] [--repeat 3] [--baseline /path/to/checkout ...]

A store is filled with ``--messages`` messages of one origin (the sender's own, appended in
batches of 64 as a busy hub commits them: with signed feeds, each batch one signature), a
lanchatd is started on it, and then a fresh lanchatd with ``--peer`` to it: the clock runs
from starting the newcomer (its start-up included) until its database holds every message.
Reported per run: messages/s, the newcomer's CPU seconds (less noisy than the wall clock on a
shared machine) and the sender's.  ``--baseline`` (repeatable) runs the same steps with
another checkout's code (its ``.venv/bin/python`` if it has one, else this Python with it on
PYTHONPATH), alternating with this checkout's runs, so all are measured in one invocation.
With two or more CPUs (``--pin``, the default) the newcomer runs on the first and the
sender on the second, so that neither takes the other's core by the scheduler's chance:
unpinned, the same code's runs spread 11,700-15,800 messages/s in one invocation.
Loopback only, discovery off; bounded in time (``--max-run-s``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent

#: Fills a store with the messages (run with the checkout's own code).
_FILL = r"""
import sys
from pathlib import Path
from lanchat.keyfile import load_identity
from lanchat.model import Draft
from lanchat.store import Store
state, n = Path(sys.argv[1]), int(sys.argv[2])
ident = load_identity(state)
with Store(state / "history.db", node_id=ident.node) as store:
    for start in range(0, n, 64):
        drafts = [Draft(text=f"catch-up message {i} " + "x" * 40, nick="filler", host="bench")
                  for i in range(start, min(n, start + 64))]
        if hasattr(store, "append_entries"):
            store.append_entries(drafts, ts=1_700_000_000.0 + start, key=ident.key)
        else:
            store.append_local(drafts, ts=1_700_000_000.0 + start)
print(ident.node)
"""


def _python(repo: Path) -> tuple[str, dict[str, str]]:
    venv = repo / ".venv" / "bin" / "python"
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("LANCHAT_CONFIG", None)
    env["PYTHONPATH"] = str(repo)
    return (str(venv) if venv.exists() else sys.executable), env


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon(python: str, env: dict[str, str], state: str, *extra: str,
            cpu: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    args = [python, "-m", "lanchat.daemon", "--port", "0", "--bind", "127.0.0.1",
            "--no-discovery", "--state-dir", state, "--socket", os.path.join(state, "c.sock"),
            "--nick", "bench", *extra]
    # cwd: `python -m` puts the working directory first on sys.path; run from a checkout,
    # it would import that checkout's lanchat instead of the one being measured.
    if cpu is not None:  # taskset, as bench/servers.py: every thread it starts stays there
        args = ["taskset", "--cpu-list", str(cpu), *args]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=state)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    seen = b""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if b"listening on" in line:
            port = int(line.split(b"listening on ", 1)[1].split(b" ")[0].rsplit(b":", 1)[1])
            return proc, port
    proc.kill()
    raise RuntimeError(f"lanchatd did not start: {seen.decode(errors='replace')[-2000:]}")


def _count(db: str) -> int:
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)) as conn:
            return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    except sqlite3.Error:
        return 0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _cpus(pin: bool) -> tuple[int | None, int | None]:
    """(newcomer's CPU, sender's CPU), or (None, None) unpinned."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if pin and len(cpus) >= 2 else (None, None)


def one_run(repo: Path, messages: int, max_run_s: float, pin: bool = True) -> dict[str, Any]:
    python, env = _python(repo)
    # As installed: byte-compiled (see bench/servers.py compile_checkout).
    subprocess.run([python, "-m", "compileall", "-q", str(repo / "lanchat")], check=True,
                   capture_output=True, timeout=120, env=env)
    tmp = tempfile.mkdtemp(prefix="lcc", dir="/tmp")
    try:
        src, dst = os.path.join(tmp, "s"), os.path.join(tmp, "r")
        os.makedirs(src, mode=0o700)
        os.makedirs(dst, mode=0o700)
        subprocess.run([python, "-c", _FILL, src, str(messages)], env=env, check=True,
                       capture_output=True, timeout=300, cwd=tmp)
        cpu_newcomer, cpu_sender = _cpus(pin)
        sender, port = _daemon(python, env, src, cpu=cpu_sender)
        try:
            t0 = time.monotonic()
            receiver, _ = _daemon(python, env, dst, "--peer", f"127.0.0.1:{port}",
                                  cpu=cpu_newcomer)
            try:
                db = os.path.join(dst, "history.db")
                held = 0
                while time.monotonic() - t0 < max_run_s:
                    held = _count(db)
                    if held >= messages:
                        break
                    time.sleep(0.02)
                took = time.monotonic() - t0
                cpu_r, cpu_s = _cpu_s(receiver.pid), _cpu_s(sender.pid)
            finally:
                _stop(receiver)
        finally:
            _stop(sender)
        return {"held": held, "s": round(took, 3), "per_s": round(held / took),
                "receiver_cpu_s": round(cpu_r, 3), "sender_cpu_s": round(cpu_s, 3)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"runs": runs,
            "median_per_s": statistics.median(r["per_s"] for r in runs),
            "median_receiver_cpu_s": statistics.median(r["receiver_cpu_s"] for r in runs),
            "median_sender_cpu_s": statistics.median(r["sender_cpu_s"] for r in runs)}


def _paired(mine: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """This checkout's rate over the baseline's, run by run: each pair ran back to back.

    This machine's speed moves by up to 2x from one minute to the next, so runs of the same
    code spread 10,000-18,700 messages/s in one invocation; a pair shares the minute, and the
    median of the pairs' ratios is steadier than the ratio of the two medians.
    """
    ratios = [round(m["per_s"] / t["per_s"], 3) for m, t in zip(mine, theirs, strict=True)]
    return {"paired_ratios": ratios, "median_paired_ratio": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", type=Path, action="append", default=[],
                    help="another checkout to measure in the same invocation (repeatable)")
    ap.add_argument("--max-run-s", type=float, default=120.0)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="newcomer on the first CPU, sender on the second (default: on)")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"scenario": "catchup", "messages": args.messages,
                           "pinned": _cpus(args.pin) != (None, None),
                           "loadavg_1m_before": float(Path("/proc/loadavg").read_text().split()[0])}
    mine: list[dict[str, Any]] = []
    base: dict[Path, list[dict[str, Any]]] = {repo: [] for repo in args.baseline}
    for _ in range(args.repeat):
        for repo, runs in base.items():
            runs.append(one_run(repo, args.messages, args.max_run_s, args.pin))
        mine.append(one_run(HERE, args.messages, args.max_run_s, args.pin))
    out["this"] = _summary(mine)
    if len(base) == 1:
        ((repo, runs),) = base.items()
        out["baseline"] = {"repo": str(repo), **_summary(runs), **_paired(mine, runs)}
    elif base:
        out["baselines"] = [{"repo": str(repo), **_summary(runs), **_paired(mine, runs)}
                            for repo, runs in base.items()]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
