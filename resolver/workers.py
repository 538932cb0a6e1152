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
  signal to the supervisor forces the exit, status 2, as for one process. A stop that
  comes while workers are starting stops them too, and the supervisor waits for all of
  them: status 0, as for a stop at any other time. The supervisor exits with the first
  non-zero status of a worker, else 0.
* Reloads are the supervisor's: on SIGUSR1 (or a request from a worker's ``reload``
  plugin) it reads the Corefile once and sends that text to worker 0, which loads and
  serves it or says why not; only then to the others. So a Corefile that does not load,
  or a port only worker 0 binds (metrics), fails the reload for every worker alike: the
  running configuration keeps serving everywhere. A later worker that cannot take a
  text worker 0 took is replaced by a new worker started with it. The text every worker
  serves is the one a restarted worker starts with. A reload asked for while a worker
  is starting waits for it. Workers ignore SIGUSR1 (a group-wide one reaches the
  supervisor too). A worker that has not answered a reload after ``RELOAD_TIMEOUT``
  seconds is taken for hung and killed, so that it cannot hold every later reload back:
  worker 0 is started again with the running configuration (the reload failed), a later
  worker is replaced by one started with the new text.
* A worker that exits with a non-zero status (a fatal error such as a forwarding loop)
  stops the whole server with that status, as one process would. A worker killed by a
  signal (OOM killer, crash), or that exits with status 0 when no one asked it to stop,
  is started again, at most ``MAX_RESTARTS`` times in ``RESTART_WINDOW`` seconds; past
  that the supervisor gives up and exits 1.

The supervisor is one synchronous loop: signals only write their number into a pipe
(``signal.set_wakeup_fd``) that the loop reads next to the workers' control sockets, so
no decision runs inside a signal handler. The signals it acts on are blocked from just
before ``fork`` until the new worker is registered (so a stop cannot miss it) and, in
the worker, until it has set its own dispositions (so the supervisor's handlers never
run in a worker).

Workers are forked after the supervisor has imported everything and checked the
Corefile, so a worker starts in milliseconds and shares the imported code's memory
pages until it writes to them. Each worker loads the Corefile text itself: no plugin
instance crosses a fork. Linux only (``SO_REUSEPORT`` spreads load there).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from resolver.corefile import CorefileError
from resolver.endpoints import HTTPEndpoints, Route, split_address
from resolver.logs import core_logger

log = core_logger()

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0  # seconds
#: Seconds a worker gets to answer a reload (to load and start the text, or to start as
#: a replacement); a worker that takes longer is taken for hung and killed (see
#: ``Supervisor._overdue``). Generous: starting plugins may wait on the network.
RELOAD_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1
#: What the supervisor acts on; blocked around ``fork`` (see the module docstring).
_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD})
#: The longest control message a worker accepts: a Corefile's text, JSON-quoted.
MAX_MESSAGE = 64 << 20

#: What a worker runs: (index, Corefile text, link to the supervisor) -> exit status.
Target = Callable[[int, str, "Link"], int]
#: How the supervisor reads the Corefile for a reload (raises CorefileError); None when
#: it was read from stdin and cannot be read again.
ReadCorefile = Callable[[], str] | None


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


# -- the worker's side -------------------------------------------------------------------


class Link:
    """A worker's end of its control socket: one JSON object per line each way.

    Worker to supervisor: ``{"ready": {port: bound}}`` once listening (with the ports its
    ``:0`` listeners got), ``{"request": "reload"}`` (its reload plugin saw the Corefile
    change), ``{"reloaded": null | "why not"}`` after a reload. Supervisor to worker:
    ``{"reload": TEXT}`` (load and serve this Corefile text), ``{"failed": "why"}`` (a
    reload failed before reaching any worker: worker 0 counts it in its metrics).
    """

    def __init__(self, index: int, sock: socket.socket, ports: dict[int, int]) -> None:
        self.index = index
        #: Configured port -> port to bind: worker 0's ``:0`` listeners' ports.
        self.ports = ports
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._listening: asyncio.Task[None] | None = None

    async def ready(
        self,
        ports: dict[int, int],
        reload: Callable[[str], Awaitable[str | None]],
        failed: Callable[[str], None],
    ) -> None:
        """Tell the supervisor this worker is listening, then act on its messages:
        ``reload(text)`` returns None once the text serves, else why not."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock, limit=MAX_MESSAGE)
        self._send({"ready": ports})
        self._listening = asyncio.get_running_loop().create_task(self._listen(reader, reload, failed))

    def request_reload(self) -> None:
        """Ask the supervisor to reload every worker (this worker's reload plugin saw a change)."""
        self._send({"request": "reload"})

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message).encode() + b"\n")

    async def _listen(
        self,
        reader: asyncio.StreamReader,
        reload: Callable[[str], Awaitable[str | None]],
        failed: Callable[[str], None],
    ) -> None:
        while True:
            try:
                line = await reader.readline()
            except (OSError, ValueError) as exc:  # ValueError: a line past MAX_MESSAGE
                log.error("worker %d: control channel broken: %s", self.index, exc)
                return
            if not line:
                return  # the supervisor is gone; PR_SET_PDEATHSIG stops this worker
            try:
                message = json.loads(line)
                if "reload" in message:
                    self._send({"reloaded": await reload(str(message["reload"]))})
                elif "failed" in message:
                    failed(str(message["failed"]))
            except Exception as exc:  # a bug must not end the channel: reloads would stop
                log.error("worker %d: bad control message: %r", self.index, exc, exc_info=exc)


# -- the supervisor's side ---------------------------------------------------------------


@dataclass(eq=False)
class Worker:
    index: int
    pid: int
    sock: socket.socket | None
    ready: bool = False
    #: Asked to stop (replaced after a reload it could not take): its exit is expected.
    retiring: bool = False
    #: Started again after a crash (logged once it is listening).
    restarted: bool = False
    #: The worker this one takes over from once listening (after a failed reload).
    replaces: Worker | None = None
    replaced_by: Worker | None = None
    #: Did not answer a reload in time: replaced, then killed (not asked) to stop.
    hung: bool = False
    #: Killed by the supervisor (hung in a reload): nothing it still says counts, and
    #: no reload is sent anywhere until it is reaped.
    killed: bool = False
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class Reloading:
    """A reload under way: worker 0 first, then the others, then their replacements."""

    text: str
    phase: str  # "first", "rest", "replacing"
    waiting: set[Worker]
    failed: list[tuple[Worker, str]] = field(default_factory=list)
    #: When the workers of this phase are overdue (``time.monotonic()``).
    deadline: float = field(default_factory=lambda: time.monotonic() + RELOAD_TIMEOUT)


class Supervisor:
    """Forks the workers, forwards signals to them, runs reloads, restarts the ones that crash."""

    def __init__(self, count: int, target: Target, text: str, read: ReadCorefile = None) -> None:
        self.count = count
        self.target = target
        #: The Corefile text every worker serves: what a restarted worker starts with.
        self.text = text
        self.read = read
        self.workers: dict[int, Worker] = {}  # by PID
        self.ports: dict[int, int] = {}
        self.stopping = 0  # stop signals received
        self.status = 0
        self.restarts: deque[float] = deque()
        self.reloading: Reloading | None = None
        #: A reload asked for and not started yet: "signal" (always done) or "plugin"
        #: (skipped when the file holds the text last tried).
        self.reload_wanted: str | None = None
        self.tried = text  # the Corefile text of the last reload tried (or the start)
        self.started = False
        self.selector = selectors.DefaultSelector()
        self._wakeup_read, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(self._wakeup_write, False)
        self.selector.register(self._wakeup_read, selectors.EVENT_READ, None)

    # -- the two phases cli runs ------------------------------------------------------------

    def start(self) -> bool:
        """Start every worker, worker 0 first. False if one failed or a stop came first:
        then every worker has exited, and ``status`` says how the server ends."""
        for signum in _SIGNALS:
            signal.signal(signum, _noted)
        signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        if self._spawn(0) is not None:
            self._run(lambda: self.started or bool(self.stopping))
        if self.started and not self.stopping:
            return True
        if not self.stopping:
            self._stop_all()
        self._run(lambda: not self.workers)
        return False

    def wait(self) -> int:
        """Supervise until every worker has exited; the exit status of the whole server."""
        self._run(lambda: not self.workers)
        return self.status

    def stop(self, status: int = 0) -> None:
        """Stop every worker (SIGTERM); ``status`` becomes the exit status unless one is set."""
        self.status = self.status or status
        self._stop_all()

    # -- the loop -----------------------------------------------------------------------------

    def _run(self, done: Callable[[], bool]) -> None:
        while not done():
            reloading = self.reloading
            timeout = None
            if reloading is not None and reloading.waiting:
                timeout = max(reloading.deadline - time.monotonic(), 0.0)
            for key, events in self.selector.select(timeout):
                if key.data is None:
                    self._signals()
                else:
                    self._io(key.data, events)
            self._reap()
            self._overdue()
            self._maybe_reload()

    def _signals(self) -> None:
        try:
            received = os.read(self._wakeup_read, 512)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._on_stop(signum)
            elif signum == signal.SIGUSR1:
                log.info("SIGUSR1: Reloading")
                self.reload_wanted = "signal"
            # SIGCHLD: every pass of the loop reaps

    def _io(self, worker: Worker, events: int) -> None:
        sock = worker.sock
        if sock is None:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(worker)
        if not events & selectors.EVENT_READ:
            return
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker exited (reaped separately) or closed its end
            self._close(worker)
            return
        worker.inbox += data
        while (end := worker.inbox.find(b"\n")) >= 0:
            line = bytes(worker.inbox[:end])
            del worker.inbox[: end + 1]
            try:
                message = json.loads(line)
            except ValueError:
                log.error("worker %d (PID %d): bad control message %r", worker.index, worker.pid, line[:80])
                continue
            try:
                self._message(worker, message)
            except (TypeError, ValueError, AttributeError) as exc:  # a worker's bug must not end the supervisor
                log.error("worker %d (PID %d): bad control message %r: %s", worker.index, worker.pid, line[:80], exc)

    def _message(self, worker: Worker, message: dict[str, Any]) -> None:
        if worker.killed:
            return  # a late answer from a worker taken for hung: it no longer speaks for anyone
        if "ready" in message and not worker.ready:
            ports = {int(key): int(value) for key, value in dict(message["ready"]).items()}
            self._on_ready(worker, ports)
        elif "reloaded" in message:
            self._on_reloaded(worker, message["reloaded"])
        elif message.get("request") == "reload" and self.reload_wanted is None:
            self.reload_wanted = "plugin"

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._close(worker)
                self._exited(worker, os.waitstatus_to_exitcode(wait_status))

    # -- workers starting and exiting ----------------------------------------------------

    def _spawn(self, index: int, replaces: Worker | None = None) -> Worker | None:
        """Fork worker ``index`` with the current text; None (the server stopping, status
        1) if the fork itself failed."""
        mine, theirs = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        # Blocked from before the fork until the worker is registered: a stop landing in
        # between is then acted on after, and reaches the new worker too. The child
        # inherits the mask and unblocks once its own dispositions are set.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        supervisor = os.getpid()
        try:
            try:
                pid = os.fork()
            except OSError as exc:
                mine.close()
                theirs.close()
                log.error("cannot start worker %d: %s", index, exc)
                self.status = self.status or 1
                self._stop_all()
                return None
            if pid == 0:  # the worker: never returns
                mine.close()
                self._worker_main(index, theirs, supervisor)
            theirs.close()
            mine.setblocking(False)
            worker = Worker(index, pid, mine, replaces=replaces)
            if replaces is not None:
                replaces.replaced_by = worker
            self.workers[pid] = worker
            self.selector.register(mine, selectors.EVENT_READ, worker)
            if self.stopping:  # not a start of ours to keep
                self._signal(worker, signal.SIGTERM)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return worker

    def _on_ready(self, worker: Worker, ports: dict[int, int]) -> None:
        worker.ready = True
        if not self.started and worker.index == 0 and not self.stopping:
            self.ports = ports
            for index in range(1, self.count):
                if self._spawn(index) is None:
                    return
        if worker.restarted:
            log.info("worker %d restarted", worker.index)
        old = worker.replaces
        if old is not None:
            worker.replaces = None
            old.retiring = True
            if old.pid in self.workers:  # not reaped yet (a reaped PID may be someone else's now)
                if old.hung:
                    self._kill(old)  # hung: it may never act on a SIGTERM
                else:
                    self._signal(old, signal.SIGTERM)
            log.info("worker %d (PID %d) replaced by PID %d", old.index, old.pid, worker.pid)
            reloading = self.reloading
            if reloading is not None and reloading.phase == "replacing":
                reloading.waiting.discard(worker)
                if not reloading.waiting:
                    self._reload_done()
        if not self.started and all(w.ready for w in self.workers.values()) and len(self.workers) == self.count:
            self.started = True

    def _exited(self, worker: Worker, code: int) -> None:
        reloading = self.reloading
        if reloading is not None and worker in reloading.waiting:
            reloading.waiting.discard(worker)
            if reloading.phase == "first":
                log.error("reload failed, keeping the running configuration: worker 0 exited")
                self.reloading = None
            elif not reloading.waiting:
                self._reload_next()
        if self.stopping:
            # Killed by our own SIGTERM before its handlers were in place, or by our
            # SIGKILL when it hung: a clean stop. (After a forced quit, status 2 is set.)
            ours = code == -signal.SIGTERM or (worker.killed and code == -signal.SIGKILL)
            if code != 0 and not ours and not self.status:
                self.status = code if code > 0 else 1
            return
        if worker.retiring:
            return  # replaced by a worker serving the reloaded configuration
        if not worker.ready:
            # It could not start (it printed why): the whole server stops, as one
            # process that cannot start exits.
            self.status = self.status or (code if code > 0 else 1)
            self._stop_all()
            return
        if code > 0:
            # A fatal error (forwarding loop): the worker said why. As one process
            # would, the whole server stops with that status.
            log.error("worker %d (PID %d) exited with status %d: stopping", worker.index, worker.pid, code)
            self.status = code
            self._stop_all()
            return
        if worker.killed:
            log.info("worker %d (PID %d), hung in a reload, is gone", worker.index, worker.pid)
        elif code == 0:
            log.error("worker %d (PID %d) exited though no one asked it to stop", worker.index, worker.pid)
        else:
            log.error("worker %d (PID %d) was killed by signal %d", worker.index, worker.pid, -code)
        if worker.replaced_by is not None:
            return  # its replacement is starting already
        self._restart(worker.index)

    def _restart(self, index: int) -> None:
        """Start worker ``index`` again, at most ``MAX_RESTARTS`` times a window."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            log.error("%d worker restarts in %.0fs: giving up", len(self.restarts), RESTART_WINDOW)
            self.status = 1
            self._stop_all()
            return
        self.restarts.append(now)
        restarted = self._spawn(index)
        if restarted is not None:
            restarted.restarted = True

    # -- reloads --------------------------------------------------------------------------------

    def _maybe_reload(self) -> None:
        """Start the reload asked for, once no reload runs and every worker is listening."""
        if self.reload_wanted is None or self.reloading is not None or self.stopping or not self.started:
            return
        if not all(worker.ready and not worker.killed for worker in self.workers.values()):
            return  # a worker starting, or one killed and not reaped yet: wait for it
        wanted, self.reload_wanted = self.reload_wanted, None
        first = next((w for w in self.workers.values() if w.index == 0 and not w.retiring), None)
        if first is None:
            return
        if self.read is None:
            log.error("cannot reload a Corefile read from stdin; keeping the running configuration")
            return
        try:
            text = self.read()
        except CorefileError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self._send(first, {"failed": str(exc)})
            return
        if wanted == "plugin":
            if text == self.tried:
                return  # another worker's reload plugin asked for this text already
            log.info("Reloading")
        self.tried = text
        if not self._send(first, {"reload": text}):
            log.error("reload failed, keeping the running configuration: worker 0 cannot be reached")
            return
        self.reloading = Reloading(text, "first", {first})

    def _on_reloaded(self, worker: Worker, error: object) -> None:
        reloading = self.reloading
        if reloading is None or worker not in reloading.waiting:
            return
        reloading.waiting.discard(worker)
        if reloading.phase == "first":
            if error is not None:
                log.error("reload failed, keeping the running configuration: %s", error)
                self.reloading = None
                return
            # Worker 0 serves it: it is now the server's configuration.
            self.text = reloading.text
            reloading.phase = "rest"
            reloading.deadline = time.monotonic() + RELOAD_TIMEOUT
            for other in [w for w in self.workers.values() if w is not worker and not w.retiring]:
                if self._send(other, {"reload": reloading.text}):
                    reloading.waiting.add(other)
                else:
                    reloading.failed.append((other, "its control channel is closed"))
        elif error is not None:
            reloading.failed.append((worker, str(error)))
        if not reloading.waiting:
            self._reload_next()

    def _reload_next(self) -> None:
        """Every worker after the first has answered: replace the ones that could not take it."""
        reloading = self.reloading
        assert reloading is not None
        replacing = set()
        for worker, error in reloading.failed:
            if worker.pid not in self.workers or worker.retiring:
                continue
            log.error(
                "worker %d (PID %d) cannot serve the reloaded configuration (%s): starting a new worker %d with it",
                worker.index,
                worker.pid,
                error,
                worker.index,
            )
            replacement = self._spawn(worker.index, replaces=worker)
            if replacement is None:  # the fork failed: the server is stopping (status 1)
                self.reloading = None
                return
            replacing.add(replacement)
        if not replacing:
            self._reload_done()
            return
        reloading.phase = "replacing"
        reloading.waiting = replacing
        reloading.deadline = time.monotonic() + RELOAD_TIMEOUT

    def _overdue(self) -> None:
        """Workers that did not answer a reload within ``RELOAD_TIMEOUT`` are hung (a
        plugin that never finishes starting, a deadlock): without this, one of them would
        hold every later reload back for good.

        * Worker 0 (the reload goes no further): killed and, as after any crash, started
          again with the configuration the server had.
        * A later worker: replaced, as when it says it cannot take the text, by one
          started with it; the hung one keeps its place (it may still be answering
          with the old configuration) until the replacement listens, then is killed.
        * A replacement that does not start in time: killed; the worker it was to
          replace keeps serving the old configuration, or, if that one is gone, the
          slot is started again. The reload is then incomplete, and said so.
        * While the server stops, the hung workers are killed and nothing is started.
        """
        reloading = self.reloading
        if reloading is None or not reloading.waiting or time.monotonic() < reloading.deadline:
            return
        late = list(reloading.waiting)
        reloading.waiting.clear()
        if self.stopping:
            self.reloading = None
            for worker in late:
                self._kill(worker)
            return
        if reloading.phase == "first":
            (first,) = late
            log.error(
                "reload failed, keeping the running configuration: worker 0 (PID %d) did not answer within %.0fs:"
                " restarting it",
                first.pid,
                RELOAD_TIMEOUT,
            )
            self.reloading = None
            self._kill(first)
            return
        if reloading.phase == "rest":
            for worker in late:
                worker.hung = True
                reloading.failed.append((worker, f"no answer within {RELOAD_TIMEOUT:.0f}s"))
            self._reload_next()
            return
        self.reloading = None
        for worker in late:  # replacements that did not start in time
            worker.retiring = True  # its exit is ours, not a failed start of the server
            self._kill(worker)
            old, worker.replaces = worker.replaces, None
            if old is None:
                continue
            old.replaced_by = None
            if old.pid in self.workers:
                log.error(
                    "reload incomplete: worker %d (PID %d) did not start within %.0fs; worker %d (PID %d) keeps the"
                    " previous configuration",
                    worker.index,
                    worker.pid,
                    RELOAD_TIMEOUT,
                    old.index,
                    old.pid,
                )
            else:
                log.error(
                    "reload incomplete: worker %d (PID %d) did not start within %.0fs: starting worker %d again",
                    worker.index,
                    worker.pid,
                    RELOAD_TIMEOUT,
                    worker.index,
                )
                self._restart(worker.index)

    def _kill(self, worker: Worker) -> None:
        """SIGKILL a worker taken for hung: what it says from now on is ignored."""
        worker.killed = True
        self._signal(worker, signal.SIGKILL)

    def _reload_done(self) -> None:
        self.reloading = None
        log.info("Reloading complete")

    # -- signalling and writing to workers --------------------------------------------------

    def _on_stop(self, signum: int) -> None:
        if self.stopping:
            # A second signal while the workers drain: leave now, as one process does.
            log.info("%s: Force quit", signal.Signals(signum).name)
            for worker in list(self.workers.values()):
                self._signal(worker, signal.SIGKILL)
            self.status = 2
            return
        self._stop_all()

    def _stop_all(self) -> None:
        self.stopping += 1
        for worker in list(self.workers.values()):
            self._signal(worker, signal.SIGTERM)

    @staticmethod
    def _signal(worker: Worker, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    def _send(self, worker: Worker, message: dict[str, Any]) -> bool:
        """Queue ``message`` for ``worker``; False if its control socket is closed."""
        if worker.sock is None:
            return False
        worker.outbox += json.dumps(message).encode() + b"\n"
        self._flush(worker)
        return True

    def _flush(self, worker: Worker) -> None:
        """Write what the socket takes now; the rest when it is writable again."""
        sock = worker.sock
        if sock is None:
            return
        try:
            sent = sock.send(worker.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:  # the worker is gone: its exit is reaped
            worker.outbox.clear()
            sent = 0
        del worker.outbox[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if worker.outbox else 0)
        self.selector.modify(sock, events, worker)

    def _close(self, worker: Worker) -> None:
        if worker.sock is not None:
            self.selector.unregister(worker.sock)
            worker.sock.close()
            worker.sock = None

    # -- in the worker, after fork ------------------------------------------------------------

    def _worker_main(self, index: int, sock: socket.socket, supervisor: int) -> None:
        status = 1
        try:
            # Signals are still blocked (the supervisor's mask): a worker stops at once on
            # SIGTERM until its event loop installs its own handler, leaves SIGINT to the
            # supervisor (which forwards Ctrl-C once, as SIGTERM, to every worker) and
            # SIGUSR1 too (the supervisor runs reloads). Only then may signals come in.
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self._close_inherited()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            _die_with(supervisor)
            status = self.target(index, self.text, Link(index, sock, dict(self.ports)))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)

    def _close_inherited(self) -> None:
        """The supervisor's descriptors: its wakeup pipe, selector and other workers' sockets."""
        for worker in self.workers.values():
            if worker.sock is not None:
                worker.sock.close()
        self.selector.close()
        os.close(self._wakeup_read)
        os.close(self._wakeup_write)
        self.workers = {}


def _noted(_signum: int, _frame: Any) -> None:
    """The supervisor's Python-level handler: nothing. The signal's number is already in
    the wakeup pipe, which the loop reads."""


def _die_with(supervisor: int) -> None:
    """Have the kernel SIGTERM this worker when the supervisor dies, even by SIGKILL, so
    no worker keeps serving a port with no one to stop it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above
        os._exit(1)
