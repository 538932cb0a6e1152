"""Benchmark of the core's per-query path, run by hand: ``python -m bench.core``.

Starts each server configuration pinned to CPU 1 and drives it with dnsperf pinned to
CPU 0, all on 127.0.0.1, bounded in time. For each it reports:

* max queries per second over UDP and over pipelined TCP (dnsperf at saturation),
* p50/p99 latency at fixed rates (from dnsperf -v per-query lines),
* RSS after start and after the load, and CPU seconds per 100k queries.

Configurations:

* ``static``: a bench-only plugin that answers from stored bytes: the core's own cost
  (header/question parse, routing, chain, reply) with no dnslib: the ceiling a cache hit
  can reach before the cache's work is added.
* ``whoami``: the real ``resolver`` command with whoami, which builds its reply with
  dnslib: the slow path every miss-side plugin pays.

Needs dnsperf and taskset (Debian: dnsperf, util-linux). Prints a table and writes
bench/results/core.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = "1"
CLIENT_CPU = "0"


def start(kind: str, workdir: Path) -> tuple[subprocess.Popen[str], int]:
    corefile = workdir / f"Corefile.{kind}"
    if kind == "static":
        corefile.write_text(".:0 {\n bind 127.0.0.1\n static\n}\n")
        command = [sys.executable, "-m", "bench.serve", str(corefile)]
        pattern = r"^port (\d+)$"
    else:
        corefile.write_text(".:0 {\n bind 127.0.0.1\n whoami\n}\n")
        command = [sys.executable, "-m", "resolver", "-conf", str(corefile)]
        pattern = r"^\.:(\d+)$"
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.match(pattern, proc.stdout.readline().strip())
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise SystemExit(f"{kind}: server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(port: int, queries: Path, seconds: float, mode: str = "udp", rate: int | None = None) -> str:
    command = ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries)]
    command += ["-l", str(seconds), "-m", mode, "-c", "4" if mode == "udp" else "2", "-q", "500"]
    if rate:
        command += ["-Q", str(rate), "-v"]
    return subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout


def qps(output: str) -> float:
    match = re.search(r"Queries per second:\s+([\d.]+)", output)
    return float(match.group(1)) if match else 0.0


def lost(output: str) -> float:
    match = re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", output)
    return float(match.group(1)) if match else 100.0


#: dnsperf -Q does not hold the fixed rate at first. It sends its first -q queries slowly
#: (a sched_yield after every other one: about 14 per ms here, so ~36 ms for 500), and
#: then, being behind its schedule, sends as fast as replies free outstanding slots
#: until it has caught up (src/dnsperf.c, do_send). For those first tens of ms the
#: server sees a flood with 500 queries outstanding, not the rate asked for, and the
#: slower the server the longer the catch-up: up to 2% of a 3 s run at 50k qps. The
#: fixed-rate percentiles skip the replies of the first RAMP_UP_SECONDS (``skip``).
RAMP_UP_SECONDS = 0.5


def percentiles(output: str, skip: int = 0) -> tuple[float, float]:
    """p50 and p99 in ms of dnsperf -v's per-query lines (in the order the replies came),
    leaving out the first ``skip`` replies."""
    found = [float(m.group(1)) for m in re.finditer(r"^> \S+ .* ([\d.]+)$", output, re.M)]
    latencies = sorted(found[skip:])
    if not latencies:
        return (float("nan"), float("nan"))
    return latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000


_STALL_PROBE = """
import time
end = time.perf_counter() + {seconds}
last = time.perf_counter()
lost = 0.0
while last < end:
    now = time.perf_counter()
    if now - last > 0.0005:
        lost += now - last
    last = now
print(lost)
"""


def stalls(cpu: str, seconds: float = 2.0) -> float:
    """Milliseconds per second that a busy loop pinned to ``cpu`` did not run (counting
    gaps over 0.5 ms), on a machine where nothing else wants that CPU: the time the VM's
    host took. Here it is 0 to 10 ms/s, in gaps of up to 10 ms (30-40 ms now and then),
    and every server's tail latency at fixed rates moves with it: reported beside them."""
    command = ["taskset", "-c", cpu, sys.executable, "-c", _STALL_PROBE.format(seconds=seconds)]
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    try:
        return round(float(output) * 1000 / seconds, 2)
    except ValueError:
        return float("nan")


def ramp_up(rate: int) -> int:
    """How many replies ``percentiles`` skips in a run at ``rate`` qps (RAMP_UP_SECONDS)."""
    return int(rate * RAMP_UP_SECONDS)


def load_figures(pid: int, port: int, queries: Path, seconds: float, rates: list[int]) -> dict[str, object]:
    """Saturation over UDP (with CPU per 100k queries) and TCP, then percentiles at fixed rates."""
    figures: dict[str, object] = {}
    cpu_before = cpu_seconds(pid)
    udp = dnsperf(port, queries, seconds)
    cpu_used = cpu_seconds(pid) - cpu_before
    udp_qps = qps(udp)
    figures["udp_qps"] = round(udp_qps)
    figures["udp_lost_pct"] = lost(udp)
    figures["cpu_s_per_100k"] = round(cpu_used / max(udp_qps * seconds, 1) * 100_000, 3)
    figures["tcp_qps"] = round(qps(dnsperf(port, queries, seconds, mode="tcp")))
    for rate in rates:
        output = dnsperf(port, queries, max(min(seconds, 5), 3 * RAMP_UP_SECONDS + 1), rate=rate)
        p50, p99 = percentiles(output, ramp_up(rate))
        figures[f"p50_ms@{rate}"] = round(p50, 3)
        figures[f"p99_ms@{rate}"] = round(p99, 3)
        if rate == max(rates):  # the whole run too: what dnsperf's ramp-up adds
            figures[f"p99_whole_run_ms@{rate}"] = round(percentiles(output)[1], 3)
    return figures


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if the server has not gone within 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(kind: str, seconds: float, rates: list[int], workdir: Path, queries: Path) -> dict[str, object]:
    proc, port = start(kind, workdir)
    try:
        time.sleep(0.5)
        result: dict[str, object] = {"config": kind, "rss_start_mb": round(rss_mb(proc.pid), 1)}
        result.update(load_figures(proc.pid, port, queries, seconds, rates))
        result["rss_end_mb"] = round(rss_mb(proc.pid), 1)
        return result
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each saturation run")
    parser.add_argument("--rates", default="1000,10000", help="fixed rates for latency percentiles")
    parser.add_argument("--configs", default="static,whoami")
    args = parser.parse_args()
    for tool in ("dnsperf", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed: apt-get install dnsperf util-linux")
    rates = [int(rate) for rate in args.rates.split(",") if rate]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        queries = workdir / "queries"
        queries.write_text("".join(f"host{i}.example.org A\n" for i in range(100)))
        results = [measure(kind, args.seconds, rates, workdir, queries) for kind in args.configs.split(",")]
    columns = list(results[0])
    print(" | ".join(f"{c:>14}" for c in columns))
    for row in results:
        print(" | ".join(f"{row[c]!s:>14}" for c in columns))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "core.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
