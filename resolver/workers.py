"""``-workers N``: N processes answering on the same ports, each with its own cache.

One Python process answers from one core. To use more, the supervisor (the process the
user started, the one to signal) forks N workers; each binds its own UDP and TCP sockets
with ``SO_REUSEPORT`` on the configured ports and the kernel spreads clients over them
(by a hash of the client's address and port, so one client keeps talking to one worker).

* Worker 0 starts first. It alone serves the HTTP endpoints (health, ready, metrics):
  their ports cannot be shared the way DNS ports are without scrapes landing on a
  different worker each time. So /metrics shows worker 0's counters (about 1/N of the
  queries), /health and /ready worker 0's state. When worker 0 is listening, it reports
  the ports the kernel gave its ``:0`` listeners, and the other workers bind those.
* If a worker fails to start (a port taken, a plugin that cannot start), the supervisor
  stops the others and exits 1; the worker has printed why.
* SIGTERM and SIGINT are forwarded to every worker as SIGTERM; a worker acts on the
  first SIGTERM it gets (systemd and ``timeout`` signal the whole group, so it may get
  two) and ignores SIGINT (a terminal's Ctrl-C reaches the whole group too). A second
  signal to the supervisor forces the exit, status 2, as for one process. SIGUSR1 is
  forwarded as is, so every worker reloads. The supervisor exits with the first
  non-zero status of a worker, else 0.
* A worker that exits with a status (a Corefile or fatal error such as a forwarding
  loop) stops the whole server with that status, as one process would. A worker killed
  by a signal (OOM killer, crash) is started again, at most ``MAX_RESTARTS`` times in
  ``RESTART_WINDOW`` seconds; past that the supervisor gives up and exits 1.

Workers are forked after the supervisor has imported everything and checked the
Corefile, so a worker starts in milliseconds and shares the imported code's memory
pages until it writes to them. Each worker loads the Corefile text again itself: no
plugin instance crosses a fork. Linux only (``SO_REUSEPORT`` spreads load there).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from resolver.endpoints import HTTPEndpoints, Route, split_address
from resolver.logs import core_logger

log = core_logger()

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0  # seconds
_PR_SET_PDEATHSIG = 1

Ready = Callable[[dict[int, int]], None]
#: What a worker runs: (index, configured port -> port to bind, ready callback) -> exit status.
Target = Callable[[int, dict[int, int], Ready], int]


class NoHTTPEndpoints(HTTPEndpoints):
    """The HTTP endpoints of workers after the first: routes are accepted and never bound
    (worker 0 answers them). The route carries the configured port, so a plugin that
    probes its own endpoint (health) reaches worker 0's."""

    async def add(self, address: str, path: str, handler: Any, default_port: int) -> Route:
        try:
            _host, port = split_address(address, default_port)
        except ValueError:
            port = 0
        return Route(address, path, handler, port)

    async def remove(self, route: Route) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class Worker:
    index: int
    pid: int


class Supervisor:
    """Forks the workers, forwards signals to them, restarts the ones that crash."""

    def __init__(self, count: int, target: Target) -> None:
        self.count = count
        self.target = target
        self.workers: dict[int, Worker] = {}  # by PID
        self.ports: dict[int, int] = {}
        self.stopping = 0  # stop signals received
        self.status = 0
        self.restarts: deque[float] = deque()

    # -- the supervisor's side -------------------------------------------------------------

    def start(self) -> bool:
        """Start every worker, worker 0 first; False (the others stopped) if one fails."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_reload)
        ports = self._spawn_and_wait(0)
        if ports is None:
            return self._abort()
        self.ports = ports
        for index in range(1, self.count):
            if self.stopping or self._spawn_and_wait(index) is None:
                return self._abort()
        return not self.stopping

    def wait(self) -> int:
        """Supervise until every worker has exited; the exit status of the whole server."""
        while self.workers:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self._exited(worker, wait_status)
        return self.status

    def _exited(self, worker: Worker, wait_status: int) -> None:
        code = os.waitstatus_to_exitcode(wait_status)
        if self.stopping:
            # Killed by our own SIGTERM before its handlers were in place: a clean stop.
            # (After a forced quit, status 2 is already set.)
            if code not in (0, -signal.SIGTERM) and not self.status:
                self.status = code if code > 0 else 1
            return
        if code >= 0:
            # A Corefile or fatal error (forwarding loop): the worker said why. As one
            # process would, the whole server stops with that status.
            log.error("worker %d (PID %d) exited with status %d: stopping", worker.index, worker.pid, code)
            self.status = code or 1
            self._stop_all()
            return
        log.error("worker %d (PID %d) was killed by signal %d", worker.index, worker.pid, -code)
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            log.error("%d worker restarts in %.0fs: giving up", len(self.restarts), RESTART_WINDOW)
            self.status = 1
            self._stop_all()
            return
        self.restarts.append(now)
        if self._spawn_and_wait(worker.index) is None and not self.stopping:
            self.status = 1
            self._stop_all()
        else:
            log.info("worker %d restarted", worker.index)

    def stop(self, status: int = 0) -> None:
        """Stop every worker (SIGTERM); ``status`` becomes the exit status unless one is set."""
        self.status = self.status or status
        self._stop_all()

    def _abort(self) -> bool:
        self.status = self.status or 1
        self._stop_all()
        self.wait()
        return False

    def _stop_all(self) -> None:
        self.stopping += 1
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            # A second signal while the workers drain: leave now, as one process does.
            log.info("%s: Force quit", signal.Signals(signum).name)
            self._signal_all(signal.SIGKILL)
            self.status = 2
            return
        self._stop_all()

    def _on_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self._signal_all(signal.SIGUSR1)

    def _spawn_and_wait(self, index: int) -> dict[int, int] | None:
        """Fork worker ``index``; the ports it reports once listening, None if it exited."""
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            os.close(read_end)
            self._worker_main(index, write_end, supervisor)
        os.close(write_end)
        self.workers[pid] = Worker(index, pid)
        with os.fdopen(read_end, "rb") as pipe:
            line = pipe.readline()  # EOF when the worker exits before it is listening
        if not line.startswith(b"ready "):
            return None
        return {int(key): value for key, value in json.loads(line[6:]).items()}

    # -- the worker's side ---------------------------------------------------------------

    def _worker_main(self, index: int, ready_fd: int, supervisor: int) -> None:
        status = 1
        try:
            # The supervisor's handlers were inherited: a worker stops on SIGTERM (its
            # event loop installs its own handlers) and leaves SIGINT to the supervisor,
            # which forwards Ctrl-C once, as SIGTERM, to every worker.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the worker can reload
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _die_with(supervisor)

            def ready(ports: dict[int, int]) -> None:
                os.write(ready_fd, b"ready " + json.dumps(ports).encode() + b"\n")
                os.close(ready_fd)

            status = self.target(index, dict(self.ports), ready)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)


def _die_with(supervisor: int) -> None:
    """Have the kernel SIGTERM this worker when the supervisor dies, even by SIGKILL, so
    no worker keeps serving a port with no one to stop it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above
        os._exit(1)
