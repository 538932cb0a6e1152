"""The ``resolver`` command as a user runs it: flags, exit codes, signals, reloads."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.helpers import LOOPBACK

COMMAND = [sys.executable, "-m", "resolver"]


def run(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], input=stdin, capture_output=True, text=True, timeout=30, cwd=cwd)


class Process:
    """A server started as a subprocess; reads its stdout to learn the port."""

    def __init__(self, corefile: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [*COMMAND, "-conf", str(corefile), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.matched: set[int] = set()
        self.signalled = False  # indexes of lines an earlier wait already returned
        self.port = int(self.wait_for_line(r"^\.:(\d+)$").group(1))

    def wait_for_line(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """The first output line, not returned before, that matches ``pattern``, reading
        more output as needed (the pipe read blocks, so the deadline is checked per line)."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        checked = 0
        while True:
            for index in range(checked, len(self.lines)):
                match = re.search(pattern, self.lines[index])
                if match and index not in self.matched:
                    self.matched.add(index)
                    return match
            checked = len(self.lines)
            if time.monotonic() > deadline:
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
        raise AssertionError(f"no line matching {pattern!r} in output:\n" + "\n".join(self.lines))

    def query(self, name: str, rdtype: str = "A", timeout: float = 3) -> dns.message.Message:
        return dns.query.udp(dns.message.make_query(name, rdtype), LOOPBACK, port=self.port, timeout=timeout)

    def signal(self, signum: int) -> None:
        """Send a signal; ``stop`` then does not send another (a second one forces quit)."""
        self.signalled = True
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None and not self.signalled:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.stdout is not None:
                self.lines.extend(self.proc.stdout.read().splitlines())
                self.proc.stdout.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def test_version() -> None:
    result = run("-version")
    assert result.returncode == 0
    assert result.stdout.startswith("corefile-resolver-")


def test_plugins_are_listed_in_execution_order() -> None:
    result = run("-plugins")
    assert result.returncode == 0
    from plugins import ORDER

    listed = [line.strip() for line in result.stdout.splitlines()[1:]]
    assert listed == list(ORDER)


def test_corefile_error_is_one_line_with_file_and_line_and_exit_1(tmp_path: Path) -> None:
    corefile = tmp_path / "Corefile"
    corefile.write_text(".:0 {\n    whoami\n    cahce 30\n}\n")
    result = run("-conf", str(corefile))
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f'{corefile}:3: unknown directive "cahce"')
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_corefile_is_reported_without_traceback(tmp_path: Path) -> None:
    result = run(cwd=tmp_path)  # no -conf: ./Corefile, which does not exist
    assert result.returncode == 1
    assert result.stderr.startswith("Corefile: cannot read Corefile: No such file")
    assert "Traceback" not in result.stderr


def test_suggestion_for_misspelt_directive(tmp_path: Path) -> None:
    result = run("-conf", "stdin", stdin=". {\n whoiam\n}\n")
    assert result.returncode == 1
    assert result.stderr.strip() == 'stdin:2: unknown directive "whoiam" (did you mean "whoami"?)'


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        corefile = tmp_path / "Corefile"
        corefile.write_text(f".:{port} {{\n bind 127.0.0.1\n whoami\n}}\n")
        result = run("-conf", str(corefile))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_serves_from_stdin_and_default_port_flag(tmp_path: Path) -> None:
    corefile = tmp_path / "Corefile"
    corefile.write_text(". {\n bind 127.0.0.1\n whoami\n}\n")
    proc = subprocess.Popen(
        [*COMMAND, "-conf", "stdin", "-dns.port", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(corefile.read_text())
    proc.stdin.close()
    try:
        port = int(re.match(r"^\.:(\d+)$", proc.stdout.readline().strip()).group(1))  # type: ignore[union-attr]
        reply = dns.query.udp(dns.message.make_query("example.org", "A"), LOOPBACK, port=port, timeout=3)
        assert reply.rcode() == dns.rcode.NOERROR
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        proc.stdout.close()


def test_sigterm_answers_the_query_in_flight_then_exits_0(tmp_path: Path, processes: list[Process]) -> None:
    corefile = tmp_path / "Corefile"
    corefile.write_text(".:0 {\n bind 127.0.0.1\n erratic {\n  delay 2 2s\n }\n}\n")  # every 2nd query waits 2s
    pidfile = tmp_path / "resolver.pid"
    process = Process(corefile, "-pidfile", str(pidfile))
    processes.append(process)
    assert int(pidfile.read_text()) == process.proc.pid
    assert process.query("warm-up.example.").answer  # query 1: answered at once, the server is up
    query = dns.message.make_query("slow.example.", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(query.to_wire(), (LOOPBACK, process.port))  # query 2: delayed 2s
        time.sleep(0.5)  # let it reach the server (well inside its 2s) before the signal does
        process.signal(signal.SIGTERM)
        reply = dns.message.from_wire(client.recv(4096))
    assert reply.id == query.id and reply.answer[0][0].address == "192.0.2.53"
    assert process.stop() == 0
    assert "[INFO] SIGTERM: Shutting down servers then terminating" in process.lines
    assert not pidfile.exists()


def test_sigusr1_reloads_and_a_broken_corefile_keeps_the_old_one(tmp_path: Path, processes: list[Process]) -> None:
    corefile = tmp_path / "Corefile"
    corefile.write_text(".:0 {\n bind 127.0.0.1\n whoami\n}\n")
    process = Process(corefile)
    processes.append(process)
    assert not process.query("example.org").answer  # whoami: additional only
    # The port is fixed now so that the reloaded Corefile keeps the same listener.
    corefile.write_text(f".:{process.port} {{\n bind 127.0.0.1\n erratic\n}}\n")
    process.proc.send_signal(signal.SIGUSR1)
    process.wait_for_line(r"SIGUSR1: Reloading")
    deadline = time.monotonic() + 10
    while not process.query("example.org").answer:
        assert time.monotonic() < deadline, "reload did not take effect"
        time.sleep(0.05)
    assert process.query("example.org").answer[0][0].address == "192.0.2.53"
    corefile.write_text(f".:{process.port} {{\n bind 127.0.0.1\n erratic\n bogus\n}}\n")
    process.proc.send_signal(signal.SIGUSR1)
    failure = process.wait_for_line(r"^\[ERROR\] reload failed, keeping the running configuration: (.*)$")
    assert failure.group(1) == f'{corefile}:4: unknown directive "bogus"'
    assert process.query("example.org").answer[0][0].address == "192.0.2.53"
    assert process.stop() == 0


def test_python_dash_m_and_console_script_agree() -> None:
    script = Path(sys.executable).parent / "resolver"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    assert (
        subprocess.run([str(script), "-version"], capture_output=True, text=True, timeout=30).stdout
        == run("-version").stdout
    )


def test_dns_port_out_of_range_is_a_usage_error() -> None:
    for port in ("70000", "-5", "53a"):
        result = run("-dns.port", port, "-conf", "stdin", stdin=". {\n whoami\n}\n")
        assert result.returncode == 2, port
        assert f'invalid port "{port}"' in result.stderr
        assert "Traceback" not in result.stderr


def test_unwritable_pidfile_is_one_line(tmp_path: Path) -> None:
    corefile = tmp_path / "Corefile"
    corefile.write_text(".:0 {\n bind 127.0.0.1\n whoami\n}\n")
    result = run("-conf", str(corefile), "-pidfile", str(tmp_path / "missing" / "x.pid"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"cannot write pidfile {tmp_path / 'missing' / 'x.pid'}:")
    assert "Traceback" not in result.stderr


def test_stdin_that_is_not_utf8_is_one_line() -> None:
    proc = subprocess.run([*COMMAND, "-conf", "stdin"], input=b". {\n \xff\n}\n", capture_output=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == "stdin: the Corefile is not UTF-8 text"


def test_quiet_prints_no_banner_and_default_corefile_is_read(tmp_path: Path) -> None:
    import socket as sockets

    with sockets.socket(sockets.AF_INET, sockets.SOCK_DGRAM) as probe:  # a free port to name
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    (tmp_path / "Corefile").write_text(f".:{port} {{\n bind 127.0.0.1\n whoami\n}}\n")
    proc = subprocess.Popen([*COMMAND, "-quiet"], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = dns.query.udp(dns.message.make_query("x.example.", "A"), LOOPBACK, port=port, timeout=0.5)
                break
            except (OSError, dns.exception.Timeout):
                assert time.monotonic() < deadline, "the default ./Corefile was not served"
        assert reply.rcode() == dns.rcode.NOERROR
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "corefile-resolver-" not in output and f".:{port}" not in output


def test_a_second_signal_during_lameduck_forces_the_exit(tmp_path: Path, processes: list[Process]) -> None:
    corefile = tmp_path / "Corefile"
    corefile.write_text(".:0 {\n bind 127.0.0.1\n health 127.0.0.1:0 {\n  lameduck 30s\n }\n whoami\n}\n")
    process = Process(corefile)
    processes.append(process)
    process.signal(signal.SIGTERM)
    process.wait_for_line(r"Going into lameduck mode for 30s")
    assert process.query("example.org").rcode() == dns.rcode.NOERROR  # still serving in lameduck
    process.proc.send_signal(signal.SIGINT)
    assert process.proc.wait(timeout=10) == 2
    process.wait_for_line(r"^\[INFO\] SIGINT: Force quit$")
