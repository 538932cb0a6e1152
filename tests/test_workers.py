"""``resolver -workers N``: N processes on one port, supervised by the one the user started.

Everything runs the real command as a subprocess over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import psutil
import pytest

import tests.test_cli
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
    process.wait_for_line(r"Reloading complete")  # the supervisor's, once every worker serves it
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


# -- reloads, restarts and signals at awkward moments ---------------------------------------


def erratic_at(port: int, extra: str = "") -> str:
    return f".:{port} {{\n bind 127.0.0.1\n{extra} erratic\n}}\n"


def assert_all_erratic(port: int) -> None:
    """Whichever worker a source port lands on, erratic answers (the reloaded Corefile)."""
    for reply in query_from_many_ports(port):
        assert reply.answer and reply.answer[0][0].address == "192.0.2.53"


def patched_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, patch: str) -> None:
    """Run ``resolver`` as a script that first applies ``patch``: real processes and
    signals, with a window of the supervisor or a worker made wide enough to hit."""
    script = tmp_path / "patched_resolver.py"
    script.write_text(f"import sys\n{patch}\nfrom resolver.cli import main\n\nsys.exit(main(sys.argv[1:]))\n")
    monkeypatch.setattr(tests.test_cli, "COMMAND", [sys.executable, str(script)])


class LateBanner(Process):
    """A server whose banner comes late (a worker starts slowly): its port is the one
    its Corefile names, not read from the banner."""

    def __init__(self, corefile: Path, port: int, *extra: str) -> None:
        command = [*tests.test_cli.COMMAND, "-conf", str(corefile), "-workers", "2", *extra]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.matched: set[int] = set()
        self.signalled = False
        self.port = port


def start_slowly(path: Path, servers: list[Process], *extra: str) -> LateBanner:
    port = free_port()
    path.write_text(f".:{port} {{\n bind 127.0.0.1\n whoami\n}}\n")
    process = LateBanner(path, port, *extra)
    servers.append(process)
    return process


SLOW_START = """
import asyncio, os, resolver.server, resolver.workers

_apply = resolver.server.Server.apply

async def apply(self, config):
    # A worker after the first (no HTTP endpoints), starting: it waits for the test's go.
    if isinstance(self.runtime.http, resolver.workers.NoHTTPEndpoints) and self.config is None:
        print("worker starting slowly", flush=True)
        while not os.path.exists(os.environ["GO"]):
            await asyncio.sleep(0.02)
    return await _apply(self, config)

resolver.server.Server.apply = apply
"""


async def test_a_worker_restarted_after_a_reload_serves_the_reloaded_corefile(
    tmp_path: Path, servers: list[Process]
) -> None:
    corefile = tmp_path / "Corefile"
    process = start(corefile, WHOAMI, servers)
    process.wait_for_line(r", 2 workers$")
    corefile.write_text(erratic_at(process.port))
    process.proc.send_signal(signal.SIGUSR1)
    process.wait_for_line(r"\[INFO\] Reloading complete")
    victim = workers_of(process)[0]
    os.kill(victim, signal.SIGKILL)
    process.wait_for_line(r"worker \d restarted", timeout=30)
    await wait_for(lambda: len(workers_of(process)) == 2 and victim not in workers_of(process), timeout=30)
    assert_all_erratic(process.port)
    assert process.stop() == 0


async def test_a_reload_asked_while_a_worker_starts_reaches_it(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    go = tmp_path / "go"
    monkeypatch.setenv("GO", str(go))
    patched_command(monkeypatch, tmp_path, SLOW_START)
    corefile = tmp_path / "Corefile"
    process = start_slowly(corefile, servers)
    process.wait_for_line(r"worker starting slowly", timeout=30)
    corefile.write_text(erratic_at(process.port))
    process.proc.send_signal(signal.SIGUSR1)
    process.wait_for_line(r"SIGUSR1: Reloading", timeout=30)  # the supervisor has it
    go.touch()
    process.wait_for_line(r", 2 workers$", timeout=30)
    process.wait_for_line(r"\[INFO\] Reloading complete", timeout=30)
    assert_all_erratic(process.port)
    assert process.stop() == 0


async def test_a_stop_while_a_worker_starts_stops_every_worker_with_status_0(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GO", str(tmp_path / "never"))
    patched_command(monkeypatch, tmp_path, SLOW_START)
    process = start_slowly(tmp_path / "Corefile", servers, "-pidfile", str(tmp_path / "pid"))
    process.wait_for_line(r"worker starting slowly", timeout=30)
    workers = workers_of(process)
    assert len(workers) == 2
    process.signal(signal.SIGTERM)
    assert process.stop() == 0  # a stop asked for, not a failure to start
    # The supervisor waited for every worker: none is left serving the port.
    assert not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not [line for line in process.lines if "2 workers" in line]
    assert not (tmp_path / "pid").exists()


async def test_a_stop_landing_between_fork_and_registration_reaches_the_new_worker(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM that comes while a crashed worker is forked again must reach that worker
    too: the supervisor exits 0 instead of waiting for it for ever. And a new worker
    starts with the signals blocked, so none runs the supervisor's handlers in it."""
    patched_command(
        monkeypatch,
        tmp_path,
        "import os, signal\n"
        "_fork = os.fork\n"
        "forks = []\n"
        "def fork():\n"
        "    pid = _fork()\n"
        "    if not pid:\n"
        "        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
        "        print('worker forked, signals blocked:', {signal.SIGTERM, signal.SIGUSR1} <= blocked, flush=True)\n"
        "    else:\n"
        "        forks.append(pid)\n"
        "        if len(forks) == 3:  # the restart of the killed worker\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return pid\n"
        "os.fork = fork\n",
    )
    process = start(tmp_path / "Corefile", WHOAMI, servers)
    process.wait_for_line(r", 2 workers$", timeout=30)
    victim = workers_of(process)[0]
    os.kill(victim, signal.SIGKILL)
    process.signalled = True  # the patch sends the SIGTERM
    assert process.stop() == 0
    await wait_for(lambda: not _children(process.proc.pid), timeout=30)
    forked = [line for line in process.lines if line.startswith("worker forked")]
    assert forked == ["worker forked, signals blocked: True"] * 3


async def test_a_reload_worker_0_cannot_serve_changes_no_worker(tmp_path: Path, servers: list[Process]) -> None:
    """A port only worker 0 binds (metrics) is taken: the reload fails for the whole
    server, counted in worker 0's coredns_reload_failed_total, and every worker keeps the
    running configuration."""
    corefile = tmp_path / "Corefile"
    metrics = free_port()
    process = start(corefile, f".:0 {{\n bind 127.0.0.1\n prometheus 127.0.0.1:{metrics}\n whoami\n}}\n", servers)
    process.wait_for_line(r", 2 workers$")
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        corefile.write_text(erratic_at(process.port, f" prometheus 127.0.0.1:{taken.getsockname()[1]}\n"))
        process.proc.send_signal(signal.SIGUSR1)
        failed = process.wait_for_line(r"\[ERROR\] reload failed, keeping the running configuration: (.*)")
        assert "Address already in use" in failed.group(1)
        for reply in query_from_many_ports(process.port):
            assert reply.additional and not reply.answer  # whoami everywhere
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
        assert b"coredns_reload_failed_total 1.0" in response.read()
    assert process.stop() == 0
    assert not [line for line in process.lines if "Reloading complete" in line]


async def test_a_worker_that_cannot_take_a_reload_is_replaced_by_one_that_serves_it(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    patched_command(
        monkeypatch,
        tmp_path,
        "import resolver.server, resolver.workers\n"
        "_apply = resolver.server.Server.apply\n"
        "async def apply(self, config):\n"
        "    # A reload, in a worker after the first (no HTTP endpoints)\n"
        "    if isinstance(self.runtime.http, resolver.workers.NoHTTPEndpoints) and self.config is not None:\n"
        "        raise resolver.server.ListenError('no reload for this worker')\n"
        "    return await _apply(self, config)\n"
        "resolver.server.Server.apply = apply\n",
    )
    await reload_replacing_worker_1(tmp_path / "Corefile", servers, "no reload for this worker")


async def reload_replacing_worker_1(corefile: Path, servers: list[Process], reason: str) -> None:
    """Start two workers, reload: worker 1 is replaced (for ``reason``) by one serving
    the new Corefile, and every answer is the new one's."""
    process = await two_workers(corefile, servers)
    before = workers_of(process)
    corefile.write_text(erratic_at(process.port))
    process.proc.send_signal(signal.SIGUSR1)
    replaced = process.wait_for_line(
        rf"\[ERROR\] worker 1 \(PID (\d+)\) cannot serve the reloaded configuration \({re.escape(reason)}\)",
        timeout=30,
    )
    process.wait_for_line(r"\[INFO\] Reloading complete", timeout=30)
    old = int(replaced.group(1))
    assert old in before
    await wait_for(lambda: len(workers_of(process)) == 2 and old not in workers_of(process), timeout=30)
    assert_all_erratic(process.port)
    assert process.stop() == 0


async def test_a_worker_exiting_0_unasked_is_started_again(tmp_path: Path, servers: list[Process]) -> None:
    pidfile = tmp_path / "pid"
    process = start(tmp_path / "Corefile", WHOAMI, servers, "-pidfile", str(pidfile))
    process.wait_for_line(r", 2 workers$")
    assert pidfile.read_text() == f"{process.proc.pid}\n"  # the supervisor's
    victim = workers_of(process)[1]
    os.kill(victim, signal.SIGTERM)  # it stops cleanly, status 0, as if asked
    process.wait_for_line(r"exited though no one asked it to stop", timeout=30)
    process.wait_for_line(r"worker \d restarted", timeout=30)
    await wait_for(lambda: len(workers_of(process)) == 2 and victim not in workers_of(process), timeout=30)
    assert process.proc.poll() is None
    for reply in query_from_many_ports(process.port):
        assert reply.rcode() == 0 and reply.additional
    assert pidfile.exists()
    assert process.stop() == 0
    assert not pidfile.exists()


async def test_the_supervisor_holds_no_configuration_its_workers_inherit(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    patched_command(
        monkeypatch,
        tmp_path,
        "import gc, resolver.workers\n"
        "from resolver.config import Config\n"
        "from resolver.plugin import Plugin\n"
        "_start = resolver.workers.Supervisor.start\n"
        "def start(self):\n"
        "    gc.unfreeze()\n"
        "    gc.collect()\n"
        "    held = [o for o in gc.get_objects() if isinstance(o, (Config, Plugin))]\n"
        "    print(f'supervisor holds {len(held)} configuration objects', flush=True)\n"
        "    gc.freeze()\n"
        "    return _start(self)\n"
        "resolver.workers.Supervisor.start = start\n",
    )
    corefile = ".:0 {\n bind 127.0.0.1\n errors\n prometheus 127.0.0.1:0\n cache\n whoami\n}\n"
    process = start(tmp_path / "Corefile", corefile, servers)
    held = process.wait_for_line(r"supervisor holds (\d+) configuration objects", timeout=30)
    assert held.group(1) == "0"
    process.wait_for_line(r", 2 workers$", timeout=30)
    assert process.stop() == 0


def test_kubernetes_with_workers_warns_of_the_repeated_watches(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    corefile = tmp_path / "Corefile"
    corefile.write_text(f".:0 {{\n bind 127.0.0.1\n kubernetes cluster.local {{\n  manifests {manifests}\n }}\n}}\n")
    process = Process(corefile, "-workers", "2")
    try:
        process.wait_for_line(r", 2 workers$", timeout=30)
        warning = [line for line in process.lines if line.startswith("[WARNING] kubernetes with -workers 2")]
        assert len(warning) == 1 and "2 times the watches" in warning[0]
    finally:
        assert process.stop() == 0


async def test_the_reload_plugin_reloads_every_worker_once(tmp_path: Path, servers: list[Process]) -> None:
    """Each worker's reload plugin sees the change and asks the supervisor, which reloads
    all workers with one reading of the file, once."""
    corefile = tmp_path / "Corefile"
    process = start(corefile, ".:0 {\n bind 127.0.0.1\n reload 2s 0\n whoami\n}\n", servers)
    process.wait_for_line(r", 2 workers$")
    corefile.write_text(erratic_at(process.port, " reload 2s 0\n"))
    process.wait_for_line(r"\[INFO\] Reloading complete", timeout=30)
    assert_all_erratic(process.port)
    assert process.stop() == 0
    assert len([line for line in process.lines if "Reloading complete" in line]) == 1
    assert len([line for line in process.lines if line == "[INFO] Reloading"]) == 1


def hang_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    """A command with a 2 s reload timeout whose ``Server.apply`` first runs ``body``
    (with ``later``: not worker 0; ``once(path)``: True the first time ``path`` exists)."""
    patched_command(
        monkeypatch,
        tmp_path,
        "import asyncio, os, time, resolver.server, resolver.workers\n"
        "resolver.workers.RELOAD_TIMEOUT = 2.0\n"
        "_apply = resolver.server.Server.apply\n"
        "def once(path):\n"
        "    if os.path.exists(path):\n"
        "        os.unlink(path)\n"
        "        return True\n"
        "    return False\n"
        "async def apply(self, config):\n"
        "    later = isinstance(self.runtime.http, resolver.workers.NoHTTPEndpoints)\n"
        f"{body}"
        "    return await _apply(self, config)\n"
        "resolver.server.Server.apply = apply\n",
    )


async def two_workers(corefile: Path, servers: list[Process]) -> Process:
    """Two workers serving whoami from ``corefile``, both listening."""
    process = start(corefile, WHOAMI, servers)
    process.wait_for_line(r", 2 workers$", timeout=30)
    await wait_for(lambda: len(workers_of(process)) == 2)
    return process


def hang_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, in_worker_0: bool) -> Path:
    """A command whose worker 0 (or, if not ``in_worker_0``, a later worker) hangs in the
    next reload while ``mark`` exists (once: it removes it), with a 2 s reload timeout."""
    mark = tmp_path / "hang"
    mark.write_text("")
    which = "not" if in_worker_0 else ""
    hang_patch(
        tmp_path,
        monkeypatch,
        f"    if self.config is not None and {which} later and once({str(mark)!r}):\n"
        "        await asyncio.sleep(3600)  # hung: never answers the supervisor\n",
    )
    return mark


async def test_a_worker_0_hung_in_a_reload_is_restarted_and_later_reloads_go_through(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = hang_once(monkeypatch, tmp_path, in_worker_0=True)
    corefile = tmp_path / "Corefile"
    process = await two_workers(corefile, servers)
    before = workers_of(process)
    corefile.write_text(erratic_at(process.port))
    process.proc.send_signal(signal.SIGUSR1)
    hung = process.wait_for_line(
        r"\[ERROR\] reload failed, keeping the running configuration: worker 0 \(PID (\d+)\) did not answer within 2s",
        timeout=30,
    )
    assert int(hung.group(1)) in before and not mark.exists()
    process.wait_for_line(r"worker 0 restarted", timeout=30)
    for reply in query_from_many_ports(process.port):
        assert reply.additional and not reply.answer  # whoami everywhere: the reload failed
    process.proc.send_signal(signal.SIGUSR1)  # nothing hangs now
    process.wait_for_line(r"\[INFO\] Reloading complete", timeout=30)
    assert_all_erratic(process.port)
    assert process.stop() == 0


async def test_a_later_worker_hung_in_a_reload_is_replaced_by_one_that_serves_it(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    hang_once(monkeypatch, tmp_path, in_worker_0=False)
    await reload_replacing_worker_1(tmp_path / "Corefile", servers, "no answer within 2s")


async def test_a_replacement_that_hangs_starting_is_killed_and_the_old_worker_keeps_serving(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 1 cannot take the reload; the worker started to replace it hangs while
    starting. It is killed once overdue, the reload ends, and worker 1 (the old
    configuration) still answers: no worker is lost and the server keeps running."""
    mark = tmp_path / "hang"
    hang_patch(
        tmp_path,
        monkeypatch,
        "    if later and self.config is not None:\n"
        "        raise resolver.server.ListenError('no reload for this worker')\n"
        f"    if later and once({str(mark)!r}):\n"
        "        await asyncio.sleep(3600)  # the replacement hangs starting\n",
    )
    corefile = tmp_path / "Corefile"
    process = await two_workers(corefile, servers)
    before = workers_of(process)
    mark.write_text("")
    corefile.write_text(erratic_at(process.port))
    process.proc.send_signal(signal.SIGUSR1)
    late = process.wait_for_line(
        r"\[ERROR\] reload incomplete: worker 1 \(PID (\d+)\) did not start within 2s; worker 1 \(PID (\d+)\)"
        r" keeps the previous configuration",
        timeout=30,
    )
    assert int(late.group(1)) not in before and int(late.group(2)) in before
    await wait_for(lambda: workers_of(process) == before, timeout=30)
    answers = {
        "whoami" if reply.additional and not reply.answer else "erratic"
        for reply in query_from_many_ports(process.port)
    }
    assert answers <= {"whoami", "erratic"} and "whoami" in answers  # the old worker 1 still answers
    assert process.stop() == 0


async def test_a_reload_asked_while_worker_0_hangs_runs_once_it_is_back(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second SIGUSR1 lands while worker 0 hangs in the first: it must not go to the
    worker being killed (and be lost), but run once worker 0 is back."""
    hang_once(monkeypatch, tmp_path, in_worker_0=True)
    corefile = tmp_path / "Corefile"
    process = await two_workers(corefile, servers)
    corefile.write_text(erratic_at(process.port))
    process.proc.send_signal(signal.SIGUSR1)
    process.wait_for_line(r"SIGUSR1: Reloading")
    process.proc.send_signal(signal.SIGUSR1)
    process.wait_for_line(r"SIGUSR1: Reloading")
    process.wait_for_line(r"worker 0 \(PID \d+\) did not answer within 2s", timeout=30)
    process.wait_for_line(r"\[INFO\] Reloading complete", timeout=30)
    assert_all_erratic(process.port)
    assert not [line for line in process.lines if "worker 0 exited" in line]
    assert process.stop() == 0


async def test_a_hung_worker_whose_replacement_hangs_too_keeps_its_slot(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 1 hangs in the reload, and so does the worker started to replace it: the
    server must not end up one worker short."""
    hang, hang_start = tmp_path / "hang", tmp_path / "hang-start"
    hang_patch(
        tmp_path,
        monkeypatch,
        f"    if later and self.config is not None and once({str(hang)!r}):\n"
        "        await asyncio.sleep(3600)\n"
        f"    if later and self.config is None and once({str(hang_start)!r}):\n"
        "        await asyncio.sleep(3600)\n",
    )
    corefile = tmp_path / "Corefile"
    process = await two_workers(corefile, servers)
    before = workers_of(process)
    hang.write_text("")
    hang_start.write_text("")
    corefile.write_text(erratic_at(process.port))
    process.proc.send_signal(signal.SIGUSR1)
    process.wait_for_line(r"reload incomplete: worker 1 \(PID \d+\) did not start within 2s", timeout=30)
    await wait_for(lambda: workers_of(process) == before, timeout=30)
    assert process.stop() == 0


async def test_a_stop_while_a_worker_hangs_in_a_reload_exits_0_and_starts_nothing(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 1 blocks its loop in a reload, so it never acts on SIGTERM: the stop waits
    for the reload timeout, kills it, starts no replacement and exits 0."""
    hang = tmp_path / "hang"
    hang_patch(
        tmp_path,
        monkeypatch,
        f"    if later and self.config is not None and once({str(hang)!r}):\n"
        "        time.sleep(3600)  # blocks the loop\n",
    )
    corefile = tmp_path / "Corefile"
    process = await two_workers(corefile, servers)
    hang.write_text("")
    corefile.write_text(erratic_at(process.port))
    process.proc.send_signal(signal.SIGUSR1)
    process.wait_for_line(r"SIGUSR1: Reloading")
    time.sleep(0.5)
    process.signal(signal.SIGTERM)
    assert process.stop() == 0
    assert not [line for line in process.lines if "starting a new worker" in line or "Reloading complete" in line]


def failing_fork(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, failing: int) -> None:
    """A command whose supervisor's fork number ``failing`` (counted from 1) fails, as
    when the machine is out of processes or memory."""
    patched_command(
        monkeypatch,
        tmp_path,
        "import errno, os\n"
        "_fork, _forks = os.fork, [0]\n"
        "def fork():\n"
        "    _forks[0] += 1\n"
        f"    if _forks[0] == {failing}:\n"
        "        raise OSError(errno.EAGAIN, 'Resource temporarily unavailable')\n"
        "    return _fork()\n"
        "os.fork = fork\n",
    )


async def test_a_worker_that_cannot_be_forked_stops_the_server_with_status_1(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_fork(monkeypatch, tmp_path, failing=2)  # worker 1, once worker 0 listens
    process = start_slowly(tmp_path / "Corefile", servers)  # no banner: it never starts
    process.wait_for_line(r"cannot start worker 1: .*Resource temporarily unavailable", timeout=30)
    assert process.proc.wait(timeout=30) == 1  # no spin, no half-started server
    assert "SIGTERM: Shutting down" in process.wait_for_line(r"Shutting down", timeout=5).string  # worker 0


async def test_a_restart_that_cannot_be_forked_stops_the_server_with_status_1(
    tmp_path: Path, servers: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_fork(monkeypatch, tmp_path, failing=3)  # the restart after a crash
    process = await two_workers(tmp_path / "Corefile", servers)
    survivor, victim = workers_of(process)
    os.kill(victim, signal.SIGKILL)  # a crash: the supervisor starts it again, or tries
    process.wait_for_line(r"cannot start worker \d: .*Resource temporarily unavailable", timeout=30)
    assert process.proc.wait(timeout=30) == 1
    await wait_for(lambda: not psutil.pid_exists(survivor), timeout=10)
