"""UDP to one upstream: a pool of connected sockets, one query at a time on each.

Why a pool: a socket per query costs a ``socket()``, a ``connect()``, a reader
registration, its removal and a ``close()``: about 20 us of CPU per query on this machine
class, a quarter of a cache miss. A pooled socket costs one ``send`` and one ``recv``.

Why one query at a time on a socket, rather than several matched by ID and question:
RFC 5452 wants a blind spoofer to have to guess both the source port and the ID. With one
query outstanding on a socket, a forged datagram must hit that port and that one ID; with
k queries multiplexed on it, any of k IDs would do, so every multiplexed query divides the
spoofer's work by k. The number of sockets follows the number of queries in flight
instead, as it did with a socket per query.

Why recycled: a socket kept for long fixes its port, and a port that is known (to anyone
who sees our traffic, or who learns it from one answer) leaves only the ID to guess. So a
socket answers at most ``MAX_USES`` queries and lives at most ``MAX_AGE`` seconds (or
``expire``, when shorter: ``expire 0`` gives every query a new socket again), and it is
closed at once on any anomaly: a datagram that is not the answer (wrong ID or question,
or anything arriving while no query waits on it), an ICMP error, a timeout, a query given
up. So ports keep changing, a socket never carries an old answer into the next query, and
a stuck socket never lingers. Each new socket is connected to the upstream, so the kernel
picks its port at random and drops datagrams from any other address. (CoreDNS reuses its
UDP sockets for ``expire``, 10 s, with no cap on uses.)

Per query, then, on uvloop (an echo upstream in another process, CPU of the asking
process): a socket per query 29 us; a pooled socket read through a DatagramProtocol
transport 8 us; a pooled socket whose reader stays registered for its whole life and is
read by a plain callback (``recv`` on a ready socket) 6.5 us. The last is what this module
does; it also needs no event-loop pass to open a socket. What else a query would pay for
is shared: one timer per pool rather than one per query (``call_later`` and its cancel:
~2 us), and the datagrams of one loop pass are sent together at its end (``_flush``).
"""

from __future__ import annotations

import asyncio
import errno
import math
import socket
from asyncio import Future
from typing import TYPE_CHECKING

from .matching import UpstreamError, local_address, mismatch, new_id, reason

if TYPE_CHECKING:
    from .upstream import Upstream

MAX_USES = 100  # queries one socket answers before it is closed (a new port)
MAX_AGE = 10.0  # seconds a socket lives at most (less with a shorter ``expire``)
MAX_IDLE = 256  # sockets kept open while no query uses them; more are closed on release
_MAX_DATAGRAM = 65535
_EARLY = 0.001  # uvloop's timers have millisecond steps and may fire up to one early


class Datagrams:
    """The UDP sockets to one upstream: ``exchange`` asks a query over one of them."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.idle: list[UdpSocket] = []  # a stack: the most recently used socket is reused first
        self.open: set[UdpSocket] = set()  # every socket not closed yet, idle or busy (for stop)
        self.stopped = False
        self.labels = ("forward", upstream.to, "udp")
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf  # when ``timer`` fires (infinity: no timer)
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once the plugin started
        self.outbox: list[UdpSocket] = []  # queries to send at the end of this loop pass

    async def exchange(self, query: bytes, qend: int, timeout: float, fresh: bool = False) -> bytes:
        """Send ``query`` under a new random ID and wait up to ``timeout`` for its answer.
        ``fresh``: on a socket of its own, closed afterwards and not counted in the
        connection-cache metrics (health checks, as CoreDNS's checker dials anew)."""
        conn, future = self.send(query, qend, timeout, fresh)
        ok = False
        try:
            reply = await future
            ok = True
            return reply
        except (OSError, TimeoutError) as exc:
            raise self.failure(conn, exc) from None
        finally:
            self.finish(conn, ok)

    # ``exchange`` in three steps, for a caller that awaits the future in its own frame
    # (``Upstream.exchange``: one coroutine less per query).

    def send(self, query: bytes, qend: int, timeout: float, fresh: bool = False) -> tuple[UdpSocket, Future[bytes]]:
        """Start an exchange: the socket it holds, and the future of its answer (or of
        its error: an OSError or TimeoutError). ``finish`` must follow, whatever happens."""
        if self.stopped:  # a query that outlived its configuration's grace period
            raise UpstreamError(f"dial udp {self.upstream.to}: use of closed network connection")
        loop = self.loop or asyncio.get_running_loop()
        conn = self._new(loop) if fresh else self._acquire(loop)
        future = conn.future = loop.create_future()
        conn.packet = new_id() + query[2:]
        conn.qend = qend
        conn.uses += 1
        conn.fresh = fresh
        deadline = conn.deadline = loop.time() + timeout
        if deadline < self.timer_at:
            self._arm(loop, deadline)
        outbox = self.outbox
        if not outbox:
            loop.call_soon(self._flush)
        outbox.append(conn)
        return conn, future

    def failure(self, conn: UdpSocket, exc: BaseException) -> UpstreamError:
        """The error of an exchange whose future failed, in Go's words."""
        return UpstreamError(f"read udp {local_address(conn.sock)}->{self.upstream.to}: {reason(exc)}")

    def finish(self, conn: UdpSocket, ok: bool) -> None:
        """The exchange on ``conn`` is over (``ok``: it got its answer): pool the socket
        again, or close it."""
        conn.future = None
        if ok and not conn.fresh and not conn.spoiled and conn.uses < MAX_USES and not self.stopped:
            self._release(conn, (self.loop or asyncio.get_running_loop()).time())
        else:
            self._close(conn)

    def _flush(self) -> None:
        """Send the queries of this loop pass back to back. Sent one by one, in between
        the work of each query, nearly every datagram found the upstream asleep, and
        waking it (an inter-processor interrupt, dear in a VM) was most of a ``send``:
        about 6 us, against 1 us for a datagram queued while it is awake."""
        outbox, self.outbox = self.outbox, []
        for conn in outbox:
            future = conn.future
            if future is None or future.done() or conn.closed:
                continue  # given up (timed out, cancelled, stopped) before it left
            try:
                conn.sock.send(conn.packet)
            except OSError as exc:
                conn.spoiled = True
                future.set_exception(exc)

    # -- timeouts: one timer per pool, not one per query --------------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Wake at ``when``, the nearest deadline of a waiting query. A timer per query
        (``call_later`` and its cancel) costs ~2 us on uvloop; this one fires about once
        per read timeout under steady load and then looks at every open socket."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_at(when, self._expire, loop)
        self.timer_at = when

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        self.timer_at = math.inf
        now = loop.time() + _EARLY
        nearest = math.inf
        for conn in self.open:
            future = conn.future
            if future is None or future.done():
                continue
            if conn.deadline <= now:
                future.set_exception(TimeoutError())  # its exchange closes the socket
            elif conn.deadline < nearest:
                nearest = conn.deadline
        if nearest < math.inf and not self.stopped:
            self._arm(loop, nearest)

    def _acquire(self, loop: asyncio.AbstractEventLoop) -> UdpSocket:
        """The most recently used idle socket that is still young enough, else a new one."""
        idle = self.idle
        metrics = self.upstream.metrics
        if idle:
            now = loop.time()
            while idle:
                conn = idle.pop()
                if conn.expires > now and not conn.closed:
                    counts = metrics.hits.values  # the counter's dict directly: no call per query
                    counts[self.labels] = counts.get(self.labels, 0.0) + 1.0
                    return conn
                self._close(conn)
        metrics.misses.inc(self.labels)
        return self._new(loop)

    def _new(self, loop: asyncio.AbstractEventLoop) -> UdpSocket:
        upstream = self.upstream
        try:
            sock = socket.socket(upstream.family, socket.SOCK_DGRAM)
        except OSError as exc:  # out of file descriptors: this attempt fails, the next may not
            raise UpstreamError(f"dial udp {upstream.to}: {reason(exc)}") from None
        try:
            sock.setblocking(False)
            sock.connect(upstream.sockaddr)  # a random port; the kernel drops datagrams from elsewhere
        except OSError as exc:
            sock.close()
            raise UpstreamError(f"dial udp {upstream.to}: {reason(exc)}") from None
        lifetime = min(upstream.options.expire, MAX_AGE)
        conn = UdpSocket(self, sock, loop, loop.time() + lifetime)
        self.open.add(conn)
        return conn

    def _release(self, conn: UdpSocket, now: float) -> None:
        if conn.expires <= now or len(self.idle) >= MAX_IDLE:
            self._close(conn)
        else:
            self.idle.append(conn)

    def _close(self, conn: UdpSocket) -> None:
        conn.close()
        self.open.discard(conn)

    def sweep(self, now: float) -> None:
        """Close idle sockets past their age (the forward's janitor calls this)."""
        if any(conn.expires <= now or conn.closed for conn in self.idle):
            keep = []
            for conn in self.idle:
                if conn.expires <= now or conn.closed:
                    self._close(conn)
                else:
                    keep.append(conn)
            self.idle = keep

    def close(self) -> None:
        """Close every socket; a query still waiting on one fails (the plugin stops)."""
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for conn in list(self.open):
            conn.close()
        self.open.clear()
        self.idle.clear()


class UdpSocket:
    """One connected UDP socket to the upstream, its reader registered for its whole life."""

    __slots__ = (
        "closed",
        "deadline",
        "expires",
        "fd",
        "fresh",
        "future",
        "loop",
        "packet",
        "pool",
        "qend",
        "sock",
        "spoiled",
        "uses",
    )

    def __init__(self, pool: Datagrams, sock: socket.socket, loop: asyncio.AbstractEventLoop, expires: float) -> None:
        self.pool = pool
        self.sock = sock
        self.loop = loop
        self.fd = sock.fileno()
        self.expires = expires  # closed rather than reused from then on
        self.deadline = 0.0  # when the query waiting here times out
        self.fresh = False  # a socket for one exchange only (health checks)
        self.uses = 0
        self.future: asyncio.Future[bytes] | None = None  # the query waiting, if any
        self.packet = b""  # the last query sent, as sent (its ID and question)
        self.qend = 0
        self.spoiled = False  # something odd happened here: close rather than reuse
        self.closed = False
        loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        """One datagram (the callback runs again while more are queued). Only our
        query's answer is taken; anything else is counted and spoils the socket, and the
        query goes on waiting for its real answer."""
        try:
            data = self.sock.recv(_MAX_DATAGRAM)
        except BlockingIOError:
            return
        except OSError as exc:  # an ICMP error (port unreachable: connection refused)
            self._spoil()
            future = self.future
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        future = self.future
        why = mismatch(data, self.packet, self.qend) if self.packet else "id"
        if future is None or future.done():
            # Nothing waits: a duplicate of the last answer, or a datagram nobody asked for.
            self.pool.upstream.count_ignored("late" if why is None else why)
            self._spoil()
        elif why is None:
            future.set_result(data)
        else:
            self.pool.upstream.count_ignored(why)
            self.spoiled = True

    def _spoil(self) -> None:
        """Never reuse this socket; an idle one is closed now (its reader would go on firing)."""
        self.spoiled = True
        if self.future is None and not self.closed:
            self.pool._close(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.sock.close()
        future = self.future
        if future is not None and not future.done():
            future.set_exception(OSError(errno.ECONNABORTED, "use of closed network connection"))
