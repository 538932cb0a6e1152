"""``resolver -workers N``: N processes on one port, supervised by the one the user started.

Everything runs the real command as a subprocess over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import psutil
import pytest

from tests.helpers import LOOPBACK, wait_for
from tests.test_cli import COMMAND, Process
from tests.test_endpoints import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT workers: Linux only")

WHOAMI = ".:0 {\n bind 127.0.0.1\n whoami\n}\n"


@pytest.fixture
def servers() -> Iterator[list[Process]]:
    """Processes to kill (and their workers) if a test fails halfway."""
    started: list[Process] = []
    yield started
    for process in started:
        workers = _children(process.proc.pid)
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
        for worker in workers:
            worker.kill()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def workers_of(process: Process) -> list[int]:
    return sorted(child.pid for child in _children(process.proc.pid))


def start(path: Path, text: str, servers: list[Process], *extra: str) -> Process:
    path.write_text(text)
    process = Process(path, "-workers", "2", *extra)
    servers.append(process)
    return process


def query_from_many_ports(port: int, name: str = "example.org", count: int = 32) -> list[dns.message.Message]:
    """One query from each of ``count`` source ports: the kernel spreads them over the
    workers by the client's address and port, so every worker gets some."""
    replies = []
    for _ in range(count):
        query = dns.message.make_query(name, "A")
        replies.append(dns.query.udp(query, LOOPBACK, port=port, timeout=3))
    return replies


def udp_ports_of(pid: int) -> set[int]:
    return {conn.laddr.port for conn in psutil.Process(pid).net_connections(kind="udp") if conn.laddr}


async def test_two_workers_answer_on_one_port_and_sigterm_ends_all(tmp_path: Path, servers: list[Process]) -> None:
    process = start(tmp_path / "Corefile", WHOAMI, servers)
    assert process.wait_for_line(r", 2 workers$")
    await wait_for(lambda: len(workers_of(process)) == 2)
    workers = workers_of(process)
    # Each worker has its own UDP socket on the one port (SO_REUSEPORT), not a shared one.
    for pid in workers:
        assert process.port in udp_ports_of(pid)
    for reply in query_from_many_ports(process.port):
        assert reply.rcode() == 0 and reply.additional  # whoami
    tcp = dns.query.tcp(dns.message.make_query("example.org", "A"), LOOPBACK, port=process.port, timeout=3)
    assert tcp.rcode() == 0 and tcp.additional
    process.signal(signal.SIGTERM)
    assert process.stop() == 0
    await wait_for(lambda: not any(psutil.pid_exists(pid) for pid in workers))
    shutting_down = [line for line in process.lines if "SIGTERM: Shutting down" in line]
    assert len(shutting_down) == 2  # each worker got it once


async def test_sigusr1_reloads_every_worker(tmp_path: Path, servers: list[Process]) -> None:
    corefile = tmp_path / "Corefile"
    process = start(corefile, WHOAMI, servers)
    corefile.write_text(f".:{process.port} {{\n bind 127.0.0.1\n erratic\n}}\n")
    process.proc.send_signal(signal.SIGUSR1)
    process.wait_for_line(r"Reloading complete")
    process.wait_for_line(r"Reloading complete")  # the second worker's
    # Whichever worker a source port lands on, the new configuration answers.
    for reply in query_from_many_ports(process.port):
        assert reply.answer and reply.answer[0][0].address == "192.0.2.53"
    assert process.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_to_the_whole_group_stops_cleanly_once(tmp_path: Path, signum: int) -> None:
    """A terminal's Ctrl-C (SIGINT), systemd or ``timeout`` (SIGTERM) signal every process
    of the group: each worker stops once, with no forced quit, although the supervisor
    forwards a SIGTERM too."""
    corefile = tmp_path / "Corefile"
    corefile.write_text(WHOAMI)
    command = [*COMMAND, "-conf", str(corefile), "-workers", "2"]
    pipe = subprocess.PIPE
    proc = subprocess.Popen(command, stdout=pipe, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "2 workers" in line:
                break
        workers = [child.pid for child in psutil.Process(proc.pid).children()]
        assert len(workers) == 2
        os.killpg(proc.pid, signum)
        assert proc.wait(timeout=15) == 0
        output = proc.stdout.read()
        assert "Force quit" not in output
        assert output.count("SIGTERM: Shutting down") == 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_a_second_signal_forces_the_exit_during_lameduck(tmp_path: Path, servers: list[Process]) -> None:
    corefile = f".:0 {{\n bind 127.0.0.1\n health 127.0.0.1:{free_port()} {{\n  lameduck 20s\n }}\n whoami\n}}\n"
    process = start(tmp_path / "Corefile", corefile, servers)
    await wait_for(lambda: len(workers_of(process)) == 2)
    workers = workers_of(process)
    process.signal(signal.SIGTERM)
    process.wait_for_line(r"Going into lameduck mode")
    process.signal(signal.SIGTERM)
    assert process.stop() == 2
    assert "[INFO] SIGTERM: Force quit" in process.lines
    await wait_for(lambda: not any(psutil.pid_exists(pid) for pid in workers))


async def test_a_killed_worker_is_started_again(tmp_path: Path, servers: list[Process]) -> None:
    process = start(tmp_path / "Corefile", WHOAMI, servers)
    await wait_for(lambda: len(workers_of(process)) == 2)
    victim = workers_of(process)[0]
    os.kill(victim, signal.SIGKILL)
    process.wait_for_line(r"was killed by signal 9")
    process.wait_for_line(r"worker \d restarted")
    await wait_for(lambda: len(workers_of(process)) == 2 and victim not in workers_of(process))
    for pid in workers_of(process):
        assert process.port in udp_ports_of(pid)
    for reply in query_from_many_ports(process.port):
        assert reply.rcode() == 0
    assert process.stop() == 0


async def test_http_endpoints_are_served_once_without_address_in_use(tmp_path: Path, servers: list[Process]) -> None:
    health, metrics = free_port(), free_port()
    corefile = f".:0 {{\n bind 127.0.0.1\n health 127.0.0.1:{health}\n prometheus 127.0.0.1:{metrics}\n whoami\n}}\n"
    process = start(tmp_path / "Corefile", corefile, servers)
    await wait_for(lambda: len(workers_of(process)) == 2)
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/health", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
        assert b"coredns_build_info" in response.read()
    # Only worker 0 listens on the HTTP ports.
    listening = [
        pid
        for pid in workers_of(process)
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == health
    ]
    assert len(listening) == 1
    assert not [line for line in process.lines if "address already in use" in line.lower()]
    assert process.stop() == 0


def test_a_worker_that_cannot_listen_stops_everything_with_status_1(tmp_path: Path) -> None:
    corefile = tmp_path / "Corefile"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:  # no SO_REUSEPORT: cannot be shared
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        corefile.write_text(f".:{port} {{\n bind 127.0.0.1\n whoami\n}}\n")
        result = subprocess.run(
            [*COMMAND, "-conf", str(corefile), "-workers", "2"], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    expected = f"{corefile}: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert result.stderr.strip().splitlines() == [expected]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(corefile) in (p.info["cmdline"] or [])]


def test_a_corefile_error_is_reported_once_before_any_worker(tmp_path: Path) -> None:
    corefile = tmp_path / "Corefile"
    corefile.write_text(".:0 {\n bogus\n}\n")
    result = subprocess.run([*COMMAND, "-conf", str(corefile), "-workers", "4"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f'{corefile}:2: unknown directive "bogus"']


@pytest.mark.parametrize("count", ["0", "-1", "two", "257"])
def test_bad_worker_counts_are_usage_errors(count: str) -> None:
    result = subprocess.run([*COMMAND, "-workers", count], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "invalid number of workers" in result.stderr
