"""The project side by side with the servers users would pick instead, run by hand:
``python -m bench.compare [--quick]``.

One run, all on 127.0.0.1, bounded in time (about 5 minutes; ``--quick`` about 1.5):

1. Installs what is missing from Debian (``apt-get update`` once, then ``nsd``,
   ``dnsmasq-base``, ``unbound``, ``dnsperf``), with service starts refused by
   ``policy-rc.d`` so no daemon is left running from the install.
2. Starts an authoritative upstream (nsd, ``rrl-ratelimit: 0`` so it never drops; knot
   with ``--upstream knot``) pinned to CPU 0 beside dnsperf, serving ``bench.``: 100k
   names ``hN.bench.`` (A, TTL 3600) and a wildcard ``*.w.bench.``, so that a query file
   of unique names ``mN.w.bench.`` is all misses, however long the run.
3. For each server under test, pinned to CPU 1 and configured alike (a cache of about
   20k entries in front of a forward to that upstream, no rate limits, loopback only):
   the project (``errors``, ``prometheus``, ``cache``, ``forward``), dnsmasq and unbound.
   Each is measured with dnsperf pinned to CPU 0: startup to first answer; max qps for
   cache hits over UDP (100 names asked over and over) and over pipelined TCP; p50/p99
   latency of hits at 1k, 10k, 20k, 50k qps; max qps of misses, and their latency at
   1k, 10k, 20k qps; RSS at start and after the misses (cache full); CPU seconds per
   100k hits and per 100k misses. Percentiles leave out the first half second of each
   fixed-rate run, where dnsperf floods to catch up with its schedule rather than
   sending at the rate asked (``bench.core.RAMP_UP_SECONDS``); ``p99_whole_run`` keeps
   it, at 50k qps. ``host_stall_ms_per_s``: how much of CPU 1 the VM's host took
   from a busy loop just before (``bench.core.stalls``); tail latencies follow it.

It prints one table, with the ratio of the project to each peer (for qps higher is
better; for latency, RSS, CPU and startup lower is better), and writes it as JSON to
bench/results/compare.json. Everything it started is stopped by PID at the end, on
error, and on Ctrl-C or SIGTERM. The machine may be shared: ``--rounds N`` measures
every server N times, taking turns, and keeps each figure's best (the JSON keeps every
round, and ``load1``, the load average before each run); compare servers within one run
only.

``--memory`` adds the project's startup to first answer (median of 5) and RSS, with
Corefile.example's chain and with the bench chain, and RSS with both caches full.
``--workers N`` adds the project with ``-workers N`` beside a single process, nothing
pinned (dnsperf neither): cache hits over UDP and TCP (``--servers ''`` runs only that).

The upstream shares CPU 0 with dnsperf, so the server under test has CPU 1 to itself;
at high miss rates the upstream and dnsperf compete, which caps every server alike.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.core import CLIENT_CPU, ROOT, SERVER_CPU, load_figures, lost, percentiles, qps, ramp_up, stalls, stop

SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
ZONE = "bench."
ZONE_NAMES = 100_000
HOT_NAMES = 100
CACHE_CAPACITY = 9984  # the project's default per kind (success, denial); peers get both
HIT_RATES = (1000, 10000, 20000, 50000)
WARNINGS = ("load1", "host_stall_ms_per_s")  # context for the figures, not figures: the worst round's
MISS_RATES = (1000, 10000, 20000)
MISS_CEILING = 80_000  # queries per second no server here reaches on misses: sizes the files
PEERS = ("project", "dnsmasq", "unbound")

# Debian package of each tool the harness runs.
PACKAGES = {
    "dnsperf": "dnsperf",
    "taskset": "util-linux",
    "nsd": "nsd",
    "knotd": "knot",
    "dnsmasq": "dnsmasq-base",
    "unbound": "unbound",
}

NSD_CONF = """\
server:
    ip-address: 127.0.0.1
    port: {port}
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "{dir}"
    database: ""
    zonelistfile: "{dir}/zone.list"
    xfrdfile: "{dir}/xfrd.state"
    xfrdir: "{dir}"
    pidfile: "{dir}/nsd.pid"
    logfile: "{dir}/nsd.log"
    verbosity: 0
    # Response rate limiting drops answers silently at benchmark rates: off.
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: "{zone}"
    zonefile: "{zonefile}"
"""

KNOT_CONF = """\
server:
    listen: 127.0.0.1@{port}
    rundir: "{dir}"
    user: root
    background-workers: 1
    udp-workers: 1
    tcp-workers: 1
database:
    storage: "{dir}"
log:
  - target: stderr
    any: warning
template:
  - id: default
    storage: "{dir}"
zone:
  - domain: "{zone}"
    file: "{zonefile}"
"""

UNBOUND_CONF = """\
server:
    interface: 127.0.0.1
    port: {port}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 1
    do-ip6: no
    # The upstream is on loopback, which unbound refuses to ask by default.
    do-not-query-localhost: no
    module-config: "iterator"
    qname-minimisation: no
    prefetch: no
    access-control: 127.0.0.0/8 allow
    # About {entries} answers: messages of ~100 bytes, records of ~200 with overhead.
    msg-cache-size: 4m
    rrset-cache-size: 8m
    ratelimit: 0
    ip-ratelimit: 0
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{upstream}
"""

PROJECT_COREFILE = """\
.:{port} {{
    bind 127.0.0.1
    errors
    prometheus 127.0.0.1:{metrics}
    cache
    forward . 127.0.0.1:{upstream}
}}
"""

# Corefile.example's chain with its HTTP ports free and its hosts inline: the laptop case.
EXAMPLE_COREFILE = """\
.:{port} {{
    bind 127.0.0.1
    errors
    log
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    prometheus 127.0.0.1:{metrics}
    reload
    any
    loadbalance
    hosts {{
        10.0.0.10 db.demo.local
        ttl 60
        fallthrough
    }}
    whoami
}}
"""
STARTS = 5  # startups measured per configuration (the median is kept)


# -- processes -----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the harness dies (even by SIGKILL), so a
    killed run leaves no daemon behind. Linux only; harmless to skip elsewhere."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Processes:
    """Every process the harness starts, stopped by PID (with its descendants) in reverse."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen[str]]] = []

    def start(self, name: str, command: list[str], cpu: str | None) -> subprocess.Popen[str]:
        log = (self.workdir / f"{name}.log").open("w")
        if cpu is not None:
            command = ["taskset", "-c", cpu, *command]
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.running.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """SIGTERM (then SIGKILL) the process, then any descendant it left (nsd's server
        and xfrd processes, dnsmasq's TCP children), by PID."""
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        if proc.poll() is None:
            stop(proc)
        _gone, alive = psutil.wait_procs(descendants, timeout=3)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.running = [(name, p) for name, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self.running)):
            self.stop(proc)


def _tree_sum(pid: int, measure: Callable[[psutil.Process], float]) -> float:
    """``measure`` summed over a process and its live descendants (workers, TCP children);
    a process that ends while being measured counts nothing."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += measure(proc)
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants."""
    return _tree_sum(pid, lambda proc: sum(proc.cpu_times()[:2]))


def tree_rss_mb(pid: int) -> float:
    return round(_tree_sum(pid, lambda proc: proc.memory_info().rss) / 2**20, 1)


def tree_pss_mb(pid: int) -> float:
    return round(_tree_sum(pid, lambda proc: proc.memory_full_info().pss) / 2**20, 1)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on 127.0.0.1")


def probe(port: int, name: str) -> bool:
    """One A query for ``name``; True when any answer for it comes back."""
    qname = b"".join(bytes((len(label),)) + label.encode() for label in name.rstrip(".").split(".")) + b"\x00"
    query = b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.05)
        try:
            sock.sendto(query, ("127.0.0.1", port))
            data = sock.recv(4096)
        except OSError:
            return False
    return data[:2] == b"\xbe\xef" and len(data) > 12


def wait_answering(proc: subprocess.Popen[str], port: int, name: str, timeout: float = 30.0) -> float:
    """Seconds from now until ``port`` answers a query for ``name``; raises if the
    process exits or the time runs out."""
    begin = time.monotonic()
    while time.monotonic() - begin < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before answering")
        if probe(port, name):
            return time.monotonic() - begin
        time.sleep(0.005)
    raise RuntimeError(f"no answer on port {port} within {timeout:.0f}s")


# -- installing ----------------------------------------------------------------------------


def which(tool: str) -> str | None:
    return shutil.which(tool) or next((f"{d}/{tool}" for d in SBIN if os.access(f"{d}/{tool}", os.X_OK)), None)


@contextlib.contextmanager
def no_service_starts() -> Iterator[None]:
    """Debian starts a package's service on install unless policy-rc.d says no (exit 101):
    put such a policy in place for the install, and restore what was there."""
    policy = Path("/usr/sbin/policy-rc.d")
    saved = policy.read_bytes() if policy.exists() else None
    policy.write_text("#!/bin/sh\n# bench.compare: no service starts while it installs packages\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        if saved is None:
            policy.unlink(missing_ok=True)
        else:
            policy.write_bytes(saved)


def daemon_pids(binaries: list[str]) -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["exe"]):
        if proc.info["exe"] and os.path.basename(proc.info["exe"]) in binaries:
            pids.add(proc.pid)
    return pids


def ensure_tools(upstream: str) -> None:
    """Install the missing tools (only those); stop and disable any service the install
    started anyway (a system without policy-rc.d support)."""
    tools = ["dnsperf", "taskset", "nsd" if upstream == "nsd" else "knotd", "dnsmasq", "unbound"]
    missing = [PACKAGES[tool] for tool in tools if which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing tools: run as root, or apt-get install {' '.join(missing)}")
    binaries = ["nsd", "knotd", "dnsmasq", "unbound"]
    before = daemon_pids(binaries)
    print(f"installing {' '.join(missing)} ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with no_service_starts():
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        subprocess.run(install, check=True, env=env, stdout=subprocess.DEVNULL)
    systemd = Path("/run/systemd/system").is_dir() and shutil.which("systemctl")
    for unit in ("nsd", "knot", "unbound", "dnsmasq"):
        if systemd:
            subprocess.run(["systemctl", "disable", "--now", unit], capture_output=True, check=False)
    for pid in daemon_pids(binaries) - before:
        with contextlib.suppress(psutil.Error):
            print(f"stopping {psutil.Process(pid).name()} (PID {pid}) that the install started", flush=True)
            psutil.Process(pid).terminate()


# -- files -------------------------------------------------------------------------------


def write_files(workdir: Path, seconds: float, rate_seconds: float) -> dict[str, Path]:
    """The zone and the query files. Miss files hold unique names (enough for the
    longest run at MISS_CEILING qps), one file per run, so no query is ever a hit."""
    files = {"zone": workdir / "bench.zone", "hot": workdir / "hot.queries"}
    lines = [f"$ORIGIN {ZONE}", "$TTL 3600", "@ SOA ns host 1 3600 600 86400 300", "@ NS ns", "ns A 127.0.0.1"]
    lines.append("*.w A 192.0.2.1")
    lines += [f"h{i} A 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(ZONE_NAMES)]
    files["zone"].write_text("\n".join(lines) + "\n")
    files["hot"].write_text("".join(f"h{i}.{ZONE} A\n" for i in range(HOT_NAMES)))
    files["fill"] = workdir / "fill.queries"
    files["fill"].write_text("".join(f"h{i}.{ZONE} A\nh{i}.{ZONE} AAAA\n" for i in range(CACHE_CAPACITY)))
    runs = {"miss": int(MISS_CEILING * seconds)}
    runs.update({f"miss{rate}": int(rate * rate_seconds * 1.2) for rate in MISS_RATES})
    for run, count in runs.items():
        files[run] = workdir / f"{run}.queries"
        files[run].write_text("".join(f"{run}x{i}.w.{ZONE} A\n" for i in range(count)))
    return files


# -- the servers ---------------------------------------------------------------------------


def start_upstream(kind: str, procs: Processes, workdir: Path, zonefile: Path) -> int:
    port = free_port()
    where = workdir / kind
    where.mkdir()
    if kind == "nsd":
        conf = where / "nsd.conf"
        conf.write_text(NSD_CONF.format(port=port, dir=where, zone=ZONE, zonefile=zonefile))
        command = [str(which("nsd")), "-d", "-c", str(conf)]
    else:
        conf = where / "knot.conf"
        conf.write_text(KNOT_CONF.format(port=port, dir=where, zone=ZONE, zonefile=zonefile))
        command = [str(which("knotd")), "-c", str(conf)]
    proc = procs.start(kind, command, CLIENT_CPU)
    try:
        wait_answering(proc, port, f"h1.{ZONE}")
    except RuntimeError as exc:
        raise RuntimeError(f"upstream {kind}: {exc}\n{procs.log_tail(kind)}") from None
    return port


def server_command(kind: str, port: int, upstream: int, workdir: Path, workers: int = 1) -> list[str]:
    if kind == "project":
        corefile = workdir / "Corefile"
        corefile.write_text(PROJECT_COREFILE.format(port=port, metrics=free_port(), upstream=upstream))
        command = [sys.executable, "-m", "resolver", "-conf", str(corefile), "-quiet"]
        return command + (["-workers", str(workers)] if workers > 1 else [])
    if kind == "dnsmasq":
        return [
            str(which("dnsmasq")),
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--server=127.0.0.1#{upstream}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--port={port}",
            # Its own ceiling (it warns that more costs performance); ours is 2 x 9984.
            "--cache-size=10000",
            "--dns-forward-max=10000",  # 150 by default: a miss flood would be refused
            "--user=root",
            "--pid-file=",
            "--log-facility=-",
        ]
    conf = workdir / "unbound.conf"
    conf.write_text(UNBOUND_CONF.format(port=port, dir=workdir, upstream=upstream, entries=2 * CACHE_CAPACITY))
    return [str(which("unbound")), "-d", "-c", str(conf)]


def dnsperf_run(
    port: int,
    queries: Path,
    seconds: float,
    rate: int | None = None,
    once: bool = False,
    cpu: str | None = CLIENT_CPU,
    mode: str = "udp",
) -> str:
    """dnsperf; ``once`` stops at the end of the file (a miss file is never reread)."""
    command = ["taskset", "-c", cpu] if cpu is not None else []
    command += ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(seconds), "-m", mode]
    command += ["-c", "4" if mode == "udp" else "2", "-q", "500"] + (["-n", "1"] if once else [])
    if rate:
        command += ["-Q", str(rate), "-v"]
    return subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout


def measure(kind: str, args: argparse.Namespace, procs: Processes, files: dict[str, Path]) -> dict[str, Any]:
    where = args.workdir / kind
    where.mkdir(exist_ok=True)
    port = free_port()
    command = server_command(kind, port, args.upstream_port, where)
    begin = time.monotonic()
    proc = procs.start(kind, command, SERVER_CPU)
    try:
        # The probe name is a miss: startup includes the first forward, as a real start does.
        wait_answering(proc, port, f"h{ZONE_NAMES - 1}.{ZONE}")
        figures: dict[str, Any] = {"startup_s": round(time.monotonic() - begin, 3)}
        time.sleep(0.3)
        figures["rss_start_mb"] = tree_rss_mb(proc.pid)
        figures["host_stall_ms_per_s"] = stalls(SERVER_CPU)  # the server idle: what the VM's host takes
        dnsperf_run(port, files["hot"], 1, once=True)  # the first query of each hot name
        print(f"  {kind}: hits", flush=True)
        hits = load_figures(proc.pid, port, files["hot"], args.seconds, list(HIT_RATES))
        figures.update({f"hit_{key}": value for key, value in hits.items()})
        print(f"  {kind}: misses", flush=True)
        cpu_before = tree_cpu_seconds(proc.pid)
        output = dnsperf_run(port, files["miss"], args.seconds, once=True)
        cpu_used = tree_cpu_seconds(proc.pid) - cpu_before
        miss_qps = qps(output)
        figures["miss_qps"] = round(miss_qps)
        figures["miss_lost_pct"] = lost(output)
        figures["miss_cpu_s_per_100k"] = round(cpu_used / max(_completed(output), 1) * 100_000, 3)
        for rate in MISS_RATES:
            output = dnsperf_run(port, files[f"miss{rate}"], args.rate_seconds, rate=rate, once=True)
            p50, p99 = percentiles(output, ramp_up(rate))
            figures[f"miss_p50_ms@{rate}"] = round(p50, 3)
            figures[f"miss_p99_ms@{rate}"] = round(p99, 3)
        figures["rss_full_mb"] = tree_rss_mb(proc.pid)
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} during the run")
        return figures
    except RuntimeError as exc:
        raise RuntimeError(f"{kind}: {exc}\n{procs.log_tail(kind)}") from None
    finally:
        procs.stop(proc)


def measure_workers(count: int, args: argparse.Namespace, procs: Processes, files: dict[str, Path]) -> dict[str, Any]:
    """Cache hits and misses from the project with ``-workers count``, nothing pinned
    (dnsperf neither): what more processes buy on this machine's cores."""
    where = args.workdir / f"workers{count}"
    where.mkdir(exist_ok=True)
    port = free_port()
    proc = procs.start(f"workers{count}", server_command("project", port, args.upstream_port, where, count), None)
    try:
        wait_answering(proc, port, f"h1.{ZONE}")
        time.sleep(0.3)
        # RSS counts the pages workers share with the supervisor once per process; PSS
        # splits them: the sum of PSS is what the processes take together.
        figures: dict[str, Any] = {"rss_start_mb": tree_rss_mb(proc.pid), "pss_start_mb": tree_pss_mb(proc.pid)}
        dnsperf_run(port, files["hot"], 1, once=True, cpu=None)
        cpu_before = tree_cpu_seconds(proc.pid)
        output = dnsperf_run(port, files["hot"], args.seconds, cpu=None)
        cpu_used = tree_cpu_seconds(proc.pid) - cpu_before
        figures["hit_udp_qps"] = round(qps(output))
        figures["hit_udp_lost_pct"] = lost(output)
        figures["hit_cpu_s_per_100k"] = round(cpu_used / max(_completed(output), 1) * 100_000, 3)
        figures["hit_tcp_qps"] = round(qps(dnsperf_run(port, files["hot"], args.seconds, cpu=None, mode="tcp")))
        # Misses too: a hit costs the server less than it costs dnsperf to send, so on two
        # cores hits measure dnsperf as much as the server; a miss is the server's work.
        output = dnsperf_run(port, files["miss"], args.seconds, once=True, cpu=None)
        figures["miss_qps"] = round(qps(output))
        figures["miss_lost_pct"] = lost(output)
        return figures
    except RuntimeError as exc:
        raise RuntimeError(f"workers {count}: {exc}\n{procs.log_tail(f'workers{count}')}") from None
    finally:
        procs.stop(proc)


def measure_memory(args: argparse.Namespace, procs: Processes, files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Startup to first answer (median of STARTS) and RSS, for Corefile.example's chain
    and the bench chain; for the bench chain also RSS with both caches full (9984 A
    queries answered, 9984 AAAA queries of the same names answered NODATA)."""
    results: dict[str, dict[str, Any]] = {}
    for name in ("example", "bench"):
        where = args.workdir / f"memory-{name}"
        where.mkdir(exist_ok=True)
        startups, rss = [], []
        for attempt in range(STARTS):
            port, metrics = free_port(), free_port()
            corefile = where / "Corefile"
            if name == "example":
                text = EXAMPLE_COREFILE.format(port=port, health=free_port(), ready=free_port(), metrics=metrics)
                probe_name = "db.demo.local."
            else:
                text = PROJECT_COREFILE.format(port=port, metrics=metrics, upstream=args.upstream_port)
                probe_name = f"h{ZONE_NAMES - 1}.{ZONE}"
            corefile.write_text(text)
            command = [sys.executable, "-m", "resolver", "-conf", str(corefile), "-quiet"]
            begin = time.monotonic()
            proc = procs.start(f"memory-{name}", command, SERVER_CPU)
            try:
                wait_answering(proc, port, probe_name)
                startups.append(time.monotonic() - begin)
                time.sleep(0.5)
                rss.append(tree_rss_mb(proc.pid))
                if name == "bench" and attempt == STARTS - 1:
                    results[name] = fill_caches(proc.pid, port, metrics, files)
            except RuntimeError as exc:
                raise RuntimeError(f"memory {name}: {exc}\n{procs.log_tail(f'memory-{name}')}") from None
            finally:
                procs.stop(proc)
        figures = results.setdefault(name, {})
        figures["startup_s"] = round(sorted(startups)[len(startups) // 2], 3)
        figures["startup_max_s"] = round(max(startups), 3)
        figures["rss_start_mb"] = sorted(rss)[len(rss) // 2]
    return results


def fill_caches(pid: int, port: int, metrics: int, files: dict[str, Path]) -> dict[str, Any]:
    """Fill the success and denial caches, as bench.cache does; their sizes from /metrics."""
    command = ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(files["fill"])]
    command += ["-n", "1", "-c", "4", "-q", "200", "-l", "60"]
    output = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    figures: dict[str, Any] = {"fill_lost_pct": lost(output), "rss_full_mb": tree_rss_mb(pid)}
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
        text = response.read().decode()
    for kind in ("success", "denial"):
        match = re.search(rf'^coredns_cache_entries\{{[^}}]*type="{kind}"[^}}]*\}} ([\d.e+]+)$', text, re.M)
        figures[f"entries_{kind}"] = int(float(match.group(1))) if match else 0
    return figures


def _completed(output: str) -> int:
    for line in output.splitlines():
        if "Queries completed:" in line:
            return int(line.split()[2])
    return 0


# -- the table -----------------------------------------------------------------------------

# Figures where more is better; for every other figure less is better.
HIGHER_IS_BETTER = ("hit_udp_qps", "hit_tcp_qps", "miss_qps")


def best_of(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per server and figure, the best of the rounds: noise from elsewhere on the machine
    only ever makes a figure worse. ``load1`` (the load average before the run) and
    ``host_stall_ms_per_s`` keep their highest value, as a warning."""
    best: dict[str, dict[str, Any]] = {}
    for round_ in rounds:
        for kind, figures in round_.items():
            mine = best.setdefault(kind, {})
            for key, value in figures.items():
                old = mine.get(key)
                if not _number(value):
                    mine.setdefault(key, value)
                elif not _number(old):
                    mine[key] = value
                elif key in HIGHER_IS_BETTER or key in WARNINGS:
                    mine[key] = max(mine[key], value)
                else:
                    mine[key] = min(mine[key], value)
    return best


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and value == value  # NaN: no figure (no latency lines)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The project's figure divided by each peer's."""
    mine = results.get("project", {})
    table: dict[str, dict[str, float | None]] = {}
    for peer, figures in results.items():
        if peer == "project":
            continue
        table[peer] = {}
        for key, value in figures.items():
            theirs, ours = value, mine.get(key)
            ok = isinstance(ours, int | float) and isinstance(theirs, int | float) and theirs
            table[peer][key] = round(ours / theirs, 2) if ok else None  # type: ignore[operator]
    return table


def render(results: dict[str, dict[str, Any]], relative: dict[str, dict[str, float | None]]) -> str:
    keys = list(dict.fromkeys(key for figures in results.values() for key in figures))
    peers = list(results)
    header = ["figure", *peers, *(f"project/{peer}" for peer in relative)]
    rows = [header]
    for key in keys:
        row = [key + (" (+)" if key in HIGHER_IS_BETTER else "")]
        row += [str(results[peer].get(key, "")) for peer in peers]
        row += [_ratio_text(relative[peer].get(key)) for peer in relative]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines) + "\n(+): more is better; elsewhere less is better (ms, MB, s)."


def _ratio_text(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


# -- main ------------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (3 s saturation, 2 s at fixed rates)")
    parser.add_argument("--seconds", type=float, default=10, help="length of each saturation run")
    parser.add_argument("--rate-seconds", type=float, default=4, help="length of each fixed-rate run")
    parser.add_argument("--servers", default=",".join(PEERS), help="which of project,dnsmasq,unbound to run")
    parser.add_argument("--rounds", type=int, default=1, help="measure every server N times; keep the best")
    parser.add_argument(
        "--workers", type=int, default=0, help="also compare the project unpinned with 1 and N worker processes"
    )
    parser.add_argument(
        "--memory", action="store_true", help="also measure the project's startup and RSS (started, caches full)"
    )
    parser.add_argument("--upstream", choices=("nsd", "knot"), default="nsd")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "compare.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rate_seconds = 3.0, 2.0
    servers = [name for name in args.servers.split(",") if name]
    if unknown := set(servers) - set(PEERS):
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    ensure_tools(args.upstream)
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        args.workdir = Path(tmp)
        procs = Processes(args.workdir)
        try:
            return run(args, servers, procs)
        finally:
            procs.stop_all()


def run(args: argparse.Namespace, servers: list[str], procs: Processes) -> int:
    files = write_files(args.workdir, args.seconds, args.rate_seconds)
    args.upstream_port = start_upstream(args.upstream, procs, args.workdir, files["zone"])
    print(f"upstream {args.upstream} on 127.0.0.1:{args.upstream_port}", flush=True)
    rounds: list[dict[str, dict[str, Any]]] = []
    for number in range(args.rounds):
        # Servers take turns within a round, so a burst of load from elsewhere on the
        # machine hurts one round of each rather than every run of one server.
        rounds.append({})
        for kind in servers:
            print(f"round {number + 1}: {kind} ...", flush=True)
            load = os.getloadavg()[0]
            rounds[-1][kind] = {**measure(kind, args, procs, files), "load1": round(load, 2)}
    results = best_of(rounds)
    relative = ratios(results)
    if results:
        print(render(results, relative))
    scaling: dict[str, dict[str, Any]] = {}
    if args.workers > 1:
        runs = []
        for number in range(args.rounds):
            runs.append({})
            for count in (1, args.workers):
                print(f"round {number + 1}: project, {count} worker(s), unpinned ...", flush=True)
                load = os.getloadavg()[0]
                runs[-1][f"workers={count}"] = {**measure_workers(count, args, procs, files), "load1": round(load, 2)}
        scaling = best_of(runs)
        print(render(scaling, {}))
    memory: dict[str, dict[str, Any]] = {}
    if args.memory:
        print("project: startup and memory ...", flush=True)
        memory = measure_memory(args, procs, files)
        print(render(memory, {}))
    report = {
        "python": sys.version.split()[0],
        "upstream": args.upstream,
        "seconds": args.seconds,
        "rate_seconds": args.rate_seconds,
        "pinning": {"servers": SERVER_CPU, "dnsperf_and_upstream": CLIENT_CPU},
        "rounds": rounds,
        "results": results,
        "project_over_peer": relative,
        "workers_unpinned": scaling,
        "project_memory": memory,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
