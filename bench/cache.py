"""Benchmark of the cache plugin, run by hand: ``python -m bench.cache``.

Starts the real ``resolver`` pinned to CPU 1 with the chain ``errors``, ``prometheus``,
``cache`` in front of ``hosts`` (a file of 10000 names, TTL 3600), so that every query
after the first is a cache hit, and drives it with dnsperf pinned to CPU 0, all on
127.0.0.1. It reports:

* the cost of one hit inside the plugin: the cache's ``serve()`` on a hit, in
  microseconds, measured in this process (no sockets, no Task), alone and behind
  ``errors`` (the chain the server runs, less prometheus);
* cache-hit queries per second over UDP and over pipelined TCP (dnsperf at saturation,
  100 names asked over and over);
* p50/p99 latency at fixed rates (from dnsperf -v per-query lines);
* RSS after start, after the load, and after filling both caches (9984 A queries for
  success entries and 9984 AAAA queries, NODATA, for denial entries), with the entry
  counts read from /metrics; CPU seconds per 100k queries.

Peers in the same run, for comparison: ``bare`` (only ``cache`` in front of ``hosts``: the
cache's own cost next to ``static``), ``nocache`` (errors, prometheus and hosts, which
builds every reply with dnslib) and ``static`` (a bench-only plugin answering from stored
bytes: the core's ceiling). Needs dnsperf and taskset. Prints a table and writes
bench/results/cache-pyX.Y.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.core import CLIENT_CPU, ROOT, SERVER_CPU, dnsperf, load_figures, lost, rss_mb, stop

FILL = 9984  # the default capacity of each kind
HOT_NAMES = 100


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def corefile(kind: str, hosts: Path, metrics_port: int) -> str:
    chain = [" bind 127.0.0.1"]
    if kind != "bare":
        chain += [" errors", f" prometheus 127.0.0.1:{metrics_port}"]
    if kind in ("cache", "bare"):
        chain.append(" cache")
    chain.append(f" hosts {hosts} {{\n  reload 0\n }}")
    return ".:0 {\n" + "\n".join(chain) + "\n}\n"


def start(kind: str, workdir: Path, hosts: Path, metrics_port: int) -> tuple[subprocess.Popen[str], int]:
    path = workdir / f"Corefile.{kind}"
    if kind == "static":
        path.write_text(".:0 {\n bind 127.0.0.1\n static\n}\n")
        command = [sys.executable, "-m", "bench.serve", str(path)]
        pattern = r"^port (\d+)$"
    else:
        path.write_text(corefile(kind, hosts, metrics_port))
        command = [sys.executable, "-m", "resolver", "-conf", str(path)]
        pattern = r"^\.:(\d+)$"
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.match(pattern, line.strip())
        if match:
            return proc, int(match.group(1))
        if not line and proc.poll() is not None:
            break  # it exited (the metrics port was taken meanwhile, say)
    proc.kill()
    raise RuntimeError(f"{kind}: server did not start")


def cache_entries(metrics_port: int) -> dict[str, float]:
    """coredns_cache_entries by type, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for match in re.finditer(r'^coredns_cache_entries\{[^}]*type="(\w+)"[^}]*\} ([\d.e+]+)$', text, re.M):
        found[match.group(1)] = float(match.group(2))
    return found


def measure(kind: str, args: argparse.Namespace, workdir: Path, files: dict[str, Path]) -> dict[str, object]:
    for attempt in range(3):
        metrics_port = free_port()
        try:
            proc, port = start(kind, workdir, files["hosts"], metrics_port)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        time.sleep(0.5)
        result: dict[str, object] = {"config": kind, "rss_start_mb": round(rss_mb(proc.pid), 1)}
        dnsperf(port, files["hot"], 1)  # the first (missing) query of each name
        result.update(load_figures(proc.pid, port, files["hot"], args.seconds, args.rates))
        result["rss_load_mb"] = round(rss_mb(proc.pid), 1)
        if kind != "static":
            command = ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port)]
            command += ["-d", str(files["fill"]), "-n", "1", "-c", "4", "-q", "200", "-l", "60"]
            fill = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
            result["fill_lost_pct"] = lost(fill)
            result["rss_filled_mb"] = round(rss_mb(proc.pid), 1)
            if kind == "cache":  # the one with /metrics
                entries = cache_entries(metrics_port)
                result["entries_success"] = int(entries.get("success", 0))
                result["entries_denial"] = int(entries.get("denial", 0))
        return result
    finally:
        stop(proc)


def micro(hosts: Path, rounds: int = 200_000) -> dict[str, float]:
    """serve() of the cache on a hit, in microseconds: the chain's coroutine run to its end
    (it never suspends on a hit), without sockets, Task or delivery."""
    from plugins.cache.clock import TickingClock
    from resolver import wire
    from resolver.config import load
    from resolver.plugin import Registry
    from resolver.request import UDP, Request

    text = corefile("cache", hosts, 9153).replace(" prometheus 127.0.0.1:9153\n", "")
    config = load(text, "Corefile", Registry.default(), default_port=0)
    block = config.blocks[0]
    cache = block.find("cache")
    assert cache is not None and isinstance(cache.clock, TickingClock)  # type: ignore[attr-defined]
    # host1.example.org A with EDNS (UDP size 1232), as dnsperf -e would send it.
    name = b"".join(bytes((len(label),)) + label for label in (b"host1", b"example", b"org")) + b"\x00"
    data = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01" + name + b"\x00\x01\x00\x01"
    data += b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    req = Request(data, wire.parse_question(data), ("127.0.0.1", 40000), UDP, "dns://127.0.0.1:53", ".")
    asyncio.run(block.handler(req))  # the miss fills the entry
    alone = functools.partial(cache.serve, next=block.handler)  # type: ignore[union-attr]
    return {
        "hit_serve_us": measure_hits(alone, req, rounds),
        "hit_chain_us": measure_hits(block.handler, req, rounds),
    }


def measure_hits(handler: Any, req: Any, rounds: int) -> float:
    def run(count: int) -> float:
        begin = time.perf_counter()
        for _ in range(count):
            step = handler(req)
            try:
                step.send(None)
            except StopIteration:
                pass
            else:
                raise AssertionError("a hit suspended")
        return (time.perf_counter() - begin) / count * 1e6

    run(rounds // 10)
    return round(min(run(rounds) for _ in range(5)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each saturation run")
    parser.add_argument("--rates", default="1000,10000", help="fixed rates for latency percentiles")
    parser.add_argument("--configs", default="cache,bare,nocache,static")
    args = parser.parse_args()
    args.rates = [int(rate) for rate in args.rates.split(",") if rate]
    for tool in ("dnsperf", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed: apt-get install dnsperf util-linux")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = {name: workdir / name for name in ("hosts", "hot", "fill")}
        names = [f"host{i}.example.org" for i in range(FILL)]
        files["hosts"].write_text(
            "".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} {n}\n" for i, n in enumerate(names))
        )
        files["hot"].write_text("".join(f"{name} A\n" for name in names[:HOT_NAMES]))
        files["fill"].write_text("".join(f"{name} A\n{name} AAAA\n" for name in names))
        hit = micro(files["hosts"])
        print(
            f"python {sys.version.split()[0]}: a hit: cache serve() {hit['hit_serve_us']} us, "
            f"errors+cache {hit['hit_chain_us']} us"
        )
        results = [measure(kind, args, workdir, files) for kind in args.configs.split(",")]
    columns = list(dict.fromkeys(column for row in results for column in row))
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in results:
        print(" | ".join(f"{row.get(c, '')!s:>14}" for c in columns))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    report = {"python": sys.version.split()[0], **hit, "runs": results}
    (out / f"cache-py{version}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
