"""Benchmark of the miss path (cache miss, forward to a fast local upstream), run by hand:
``python -m bench.forward``.

The same setup as ``bench.compare``'s miss figures, alone: nsd on 127.0.0.1 as the
upstream (``rrl-ratelimit: 0``) pinned to CPU 0 beside dnsperf, the project with
``errors``, ``prometheus``, ``cache``, ``forward`` pinned to CPU 1, and a query file of
unique names (all misses). Each round starts a fresh project (an empty cache) and runs
dnsperf once through the file at saturation, printing one line per round:

* queries per second, queries lost, CPU seconds per 100k queries,
* the lowest and highest of dnsperf's per-second rates (``-S 1``): a stall (a second in
  which the server answered little) shows as a low minimum,
* the share of queries that needed a new UDP socket (forward's connection-cache misses)
  and the upstream packets forward ignored (not the answer to a query waiting),
* the load average before the round (the machine may be shared: compare rounds of one
  run only).

``--profile FILE`` attaches py-spy (``pip install py-spy``) to the last round and writes
its flame graph input (``--format raw``: collapsed stacks, one line per stack), so where a
miss spends its time can be read off with ``sort -t' ' -k2 -n``. py-spy leaves out time in
system calls; ``--perf FILE`` records the last round with ``perf record -g`` instead, and
on Python 3.12+ starts the server with ``-X perf`` so that perf names the Python functions
(kernel time included): ``perf report -i FILE --no-children --sort sym``. ``--rate N``
runs at a fixed rate instead of saturation (``-Q N``) and adds p50/p99 latency. Loopback only, bounded in time;
everything started is stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.compare import (
    ZONE,
    ZONE_NAMES,
    Processes,
    ensure_tools,
    free_port,
    server_command,
    start_upstream,
    tree_cpu_seconds,
    wait_answering,
)
from bench.core import CLIENT_CPU, SERVER_CPU, lost, percentiles, qps, ramp_up

NAMES_PER_SECOND = 60_000  # more than any run here answers: no name is asked twice


def write_files(workdir: Path, seconds: float, rounds: int) -> tuple[Path, list[Path]]:
    zone = workdir / "bench.zone"
    lines = [f"$ORIGIN {ZONE}", "$TTL 3600", "@ SOA ns host 1 3600 600 86400 300", "@ NS ns", "ns A 127.0.0.1"]
    lines.append("*.w A 192.0.2.1")
    lines += [f"h{i} A 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(ZONE_NAMES)]
    zone.write_text("\n".join(lines) + "\n")
    count = int(NAMES_PER_SECOND * seconds)
    files = []
    for number in range(rounds):
        path = workdir / f"miss{number}.queries"
        path.write_text("".join(f"r{number}x{i}.w.{ZONE} A\n" for i in range(count)))
        files.append(path)
    return zone, files


def dnsperf(port: int, queries: Path, seconds: float, rate: int | None) -> str:
    command = ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries)]
    command += ["-l", str(seconds), "-c", "4", "-q", "500", "-n", "1", "-S", "1"]
    if rate:
        command += ["-Q", str(rate), "-v"]  # -v: one line per query, for percentiles
    return subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout


def per_second(output: str) -> list[float]:
    """dnsperf -S 1's interval rates (the last, partial interval left out)."""
    rates = [float(match.group(1)) for match in re.finditer(r"^\d+\.\d+: ([\d.]+)$", output, re.M)]
    return rates[1:-1] if len(rates) > 2 else rates


def completed(output: str) -> int:
    match = re.search(r"Queries completed:\s+(\d+)", output)
    return int(match.group(1)) if match else 0


def udp_sockets(corefile: Path) -> tuple[float, float, float]:
    """From /metrics: forward's UDP connection-cache hits and misses (how often a query
    found a pooled socket, and how often it needed a new one), and the upstream packets
    it ignored (each one closes a socket)."""
    port = re.search(r"prometheus 127.0.0.1:(\d+)", corefile.read_text())
    if port is None:
        return (0.0, 0.0, 0.0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts = []
    for kind in ("hits", "misses"):
        match = re.search(rf'^coredns_proxy_conn_cache_{kind}_total{{[^}}]*proto="udp"[^}}]*}} ([\d.e+]+)$', text, re.M)
        counts.append(float(match.group(1)) if match else 0.0)
    ignored = re.findall(r"^corefile_resolver_forward_ignored_replies_total{[^}]*} ([\d.e+]+)$", text, re.M)
    return counts[0], counts[1], sum(float(value) for value in ignored)


def one_round(args: argparse.Namespace, procs: Processes, upstream: int, queries: Path, last: bool) -> dict[str, float]:
    where = args.workdir / f"project-{queries.stem}"
    where.mkdir()
    port = free_port()
    command = server_command("project", port, upstream, where)
    perf = args.perf if last else None
    if perf is not None and sys.version_info >= (3, 12):
        command[1:1] = ["-X", "perf"]  # perf maps for Python functions
    proc = procs.start("project", command, SERVER_CPU)
    profile = args.profile if last else None
    spy = None
    try:
        wait_answering(proc, port, f"h{ZONE_NAMES - 1}.{ZONE}")
        time.sleep(0.3)
        load = os.getloadavg()[0]
        if profile is not None:
            spy_command = ["taskset", "-c", CLIENT_CPU, "py-spy", "record", "--pid", str(proc.pid), "--rate", "200"]
            spy_command += ["--format", "raw", "--output", str(profile), "--nonblocking"]
            spy = procs.start("py-spy", spy_command, None)
            time.sleep(1.0)
        elif perf is not None:
            spy_command = ["perf", "record", "-F", "499", "--call-graph", "dwarf,16384", "-p", str(proc.pid)]
            spy_command += ["-o", str(perf)]
            spy = procs.start("perf", spy_command, CLIENT_CPU)
            time.sleep(1.0)
        before = tree_cpu_seconds(proc.pid)
        output = dnsperf(port, queries, args.seconds, args.rate)
        used = tree_cpu_seconds(proc.pid) - before
        rates = per_second(output)
        sockets = udp_sockets(where / "Corefile")
        latency = {}
        if args.rate:
            p50, p99 = percentiles(output, ramp_up(args.rate))
            latency = {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}
        return {
            **latency,
            "qps": round(qps(output)),
            "lost_pct": lost(output),
            "cpu_s_per_100k": round(used / max(completed(output), 1) * 100_000, 2),
            "min_qps_1s": round(min(rates)) if rates else 0,
            "max_qps_1s": round(max(rates)) if rates else 0,
            "new_sockets_pct": round(100 * sockets[1] / max(sockets[0] + sockets[1], 1), 2),
            "ignored_replies": int(sockets[2]),
            "load1": round(load, 2),
        }
    finally:
        if spy is not None:
            spy.send_signal(2)  # py-spy and perf write their file on SIGINT
            try:
                spy.wait(timeout=20)
            except subprocess.TimeoutExpired:
                procs.stop(spy)
        procs.stop(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=0, help="fixed rate (dnsperf -Q) instead of saturation")
    parser.add_argument("--profile", type=Path, help="py-spy collapsed stacks of the last round to this file")
    parser.add_argument("--perf", type=Path, help="perf record -g of the last round to this file")
    args = parser.parse_args(argv)
    ensure_tools("nsd")
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
        args.workdir = Path(tmp)
        procs = Processes(args.workdir)
        try:
            zone, files = write_files(args.workdir, args.seconds, args.rounds)
            upstream = start_upstream("nsd", procs, args.workdir, zone)
            for number, queries in enumerate(files):
                figures = one_round(args, procs, upstream, queries, number == len(files) - 1)
                line = ", ".join(f"{key} {value}" for key, value in figures.items())
                print(f"round {number + 1}: {line}", flush=True)
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
