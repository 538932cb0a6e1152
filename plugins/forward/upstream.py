"""One upstream server: UDP exchanges, pooled TCP/TLS connections, and health checks.

UDP (``udp.Datagrams``): every query gets a fresh random ID and a connected socket of its
own for the time of the exchange, from a pool whose sockets are recycled after a few uses
or seconds, so that the source port keeps changing. The kernel drops datagrams from any
other address; of what arrives, only a response with our ID and our question (name
compared case-insensitively, type, class) is taken. Anything else is counted and ignored,
and the wait goes on: a blind spoofer must guess port and ID within the read timeout, and
a reply that merely arrives first is not trusted.

TCP and TLS: connections are kept per upstream in a small pool and reused while they are
younger (in idle time) than ``expire``; queries are pipelined on them and replies matched
by ID. A connection the upstream closed while it sat in the pool is retried once on a
new one, as CoreDNS does.

Health: an upstream that fails a query gets health-checked in the background (``. IN
NS``) every ``health_check`` interval until a check succeeds; each failed check adds a
fail, a success clears them. With more than ``max_fails`` fails it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from resolver import wire
from resolver.dnsnames import rcode_text
from resolver.logs import plugin_logger
from resolver.metrics import CounterVec, HistogramVec, Metrics
from resolver.request import Request

from .matching import UpstreamError, hostport, mismatch, new_id, reason
from .options import Options, Target
from .udp import Datagrams

log = plugin_logger("forward")

PROXY_NAME = "forward"  # the proxy_name label of the coredns_proxy_* metrics
PIPELINE = 64  # queries in flight on one connection before another one is opened
MAX_CONNECTIONS = 8  # per upstream and protocol; past this, queries share the least busy one
HEALTH_CHECK_TIMEOUT = 1.0  # CoreDNS's health-check read timeout
MAX_ABANDONED = 1024
_TC = 0x02  # in the third header byte


class PeerClosed(UpstreamError):
    """The upstream closed a TCP/TLS connection with our query on it."""


@dataclass(slots=True)
class ForwardMetrics:
    """The forward plugin's metrics (names and labels are CoreDNS's, plus one of ours)."""

    duration: HistogramVec
    requests: CounterVec
    responses: CounterVec
    hits: CounterVec
    misses: CounterVec
    healthcheck_failures: CounterVec
    broken: CounterVec
    rejects: CounterVec
    ignored: CounterVec

    @classmethod
    def declare(cls, metrics: Metrics) -> ForwardMetrics:
        counter = metrics.counter
        return cls(
            duration=metrics.histogram(
                "coredns_proxy_request_duration_seconds",
                "Histogram of the time each request took.",
                ("proxy_name", "to", "rcode"),
            ),
            # CoreDNS 1.10's per-upstream counts (removed in 1.11), kept for old dashboards.
            requests=counter("coredns_forward_requests_total", "Counter of requests made per upstream.", ("to",)),
            responses=counter(
                "coredns_forward_responses_total", "Counter of responses received per upstream.", ("rcode", "to")
            ),
            hits=counter(
                "coredns_proxy_conn_cache_hits_total",
                "Counter of connection cache hits per upstream and protocol.",
                ("proxy_name", "to", "proto"),
            ),
            misses=counter(
                "coredns_proxy_conn_cache_misses_total",
                "Counter of connection cache misses per upstream and protocol.",
                ("proxy_name", "to", "proto"),
            ),
            healthcheck_failures=counter(
                "coredns_proxy_healthcheck_failures_total",
                "Counter of the number of failed healthchecks.",
                ("proxy_name", "to"),
            ),
            broken=counter(
                "coredns_forward_healthcheck_broken_total",
                "Counter of the number of complete failures of the healthchecks.",
            ),
            rejects=counter(
                "coredns_forward_max_concurrent_rejects_total",
                "Counter of the number of queries rejected because the concurrent queries were at maximum.",
            ),
            ignored=counter(
                "corefile_resolver_forward_ignored_replies_total",
                "Upstream packets ignored because they did not answer our query (wrong ID or question: spoofed, "
                "late or malformed).",
                ("to", "reason"),
            ),
        )


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection to an upstream, with queries pipelined on it."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(_retrieve)  # a dial failure nobody waited for is not an error
        self.pending: dict[bytes, tuple[asyncio.Future[bytes], bytes, int]] = {}
        self.abandoned: set[bytes] = set()  # IDs whose query timed out: their late replies are expected
        self.buffer = bytearray()
        self.assigned = 0  # queries using this connection (sent, or waiting for the dial)
        self.used = time.monotonic()
        self.closed = False
        self.local = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.local = hostport(sockname)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 2:
            size = (buffer[0] << 8) | buffer[1]
            if len(buffer) < 2 + size:
                break
            message = bytes(buffer[2 : 2 + size])
            del buffer[: 2 + size]
            self._reply(message)
        self.used = time.monotonic()

    def _reply(self, message: bytes) -> None:
        ident = message[:2]
        entry = self.pending.pop(ident, None)
        if entry is None:
            late = ident in self.abandoned
            self.abandoned.discard(ident)
            self.pool.upstream.count_ignored("late" if late else "id")
            return
        future, query, qend = entry
        reason = mismatch(message, query, qend)
        if future.done():
            return
        if reason is None:
            future.set_result(message)
            return
        self.pool.upstream.count_ignored(reason)
        future.set_exception(UpstreamError(f"reply from {self.pool.upstream.to} does not match the question"))

    def eof_received(self) -> bool:
        """The upstream half-closed: it answers nothing more here, so stop handing this
        connection out (queries still waiting on it fail over when it is lost)."""
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        error = PeerClosed(self._error("read", reason(exc) if exc else "EOF"))
        for future, _query, _qend in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, query: bytes, qend: int, timeout: float) -> bytes:
        """Send ``query`` (under a new ID) on this connection and wait for its reply."""
        ident = b""
        connected = self.ready.done()
        try:
            async with asyncio.timeout(timeout):
                if not connected:
                    await asyncio.shield(self.ready)
                    connected = True
                self.ready.result()
                if self.closed or self.transport is None or self.transport.is_closing():
                    raise PeerClosed(self._error("write", "EOF"))
                ident = self._new_id()
                query = ident + query[2:]
                loop = self.pool.upstream.loop or asyncio.get_running_loop()
                future: asyncio.Future[bytes] = loop.create_future()
                self.pending[ident] = (future, query, qend)
                self.transport.write(len(query).to_bytes(2, "big") + query)
                return await future
        except TimeoutError:
            if not connected:
                raise UpstreamError(f"dial {self.pool.network} {self.pool.upstream.to}: i/o timeout") from None
            # An upstream that stopped answering on this connection may never answer on
            # it again: never hand it out again (CoreDNS closes a connection on any error).
            self.close()
            raise UpstreamError(self._error("read", "i/o timeout")) from None
        finally:
            if ident and self.pending.pop(ident, None) is not None:
                if len(self.abandoned) >= MAX_ABANDONED:
                    self.abandoned.clear()
                self.abandoned.add(ident)
            self.used = time.monotonic()

    def _error(self, verb: str, reason: str) -> str:
        """Go's wording: ``read tcp 10.0.0.1:40000->10.0.0.10:53: i/o timeout``."""
        return f"{verb} {self.pool.network} {self.local}->{self.pool.upstream.to}: {reason}"

    def _new_id(self) -> bytes:
        while True:
            ident = new_id()
            if ident not in self.pending and ident not in self.abandoned:
                return ident


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Pool:
    """The TCP (or TLS) connections to one upstream."""

    def __init__(self, upstream: Upstream, tls: bool) -> None:
        self.upstream = upstream
        self.tls = tls
        self.proto = "tcp-tls" if tls else "tcp"  # the proto label CoreDNS uses
        self.network = "tcp"  # the word Go's errors use
        self.connections: list[StreamConnection] = []
        self.labels = (PROXY_NAME, upstream.to, self.proto)

    def acquire(self) -> tuple[StreamConnection, bool]:
        """A connection to use (and whether it was reused): the least busy one that is
        neither closed nor idle past ``expire``, unless all are full; else a new one."""
        now = time.monotonic()
        expire = self.upstream.options.expire
        best: StreamConnection | None = None
        for connection in list(self.connections):
            if connection.closed or (connection.transport is not None and connection.transport.is_closing()):
                connection.closed = True
                self.connections.remove(connection)
            elif connection.assigned == 0 and now - connection.used > expire and connection.ready.done():
                connection.close()
                self.connections.remove(connection)
            elif best is None or connection.assigned < best.assigned:
                best = connection
        metrics = self.upstream.metrics
        if best is not None and (best.assigned < PIPELINE or len(self.connections) >= MAX_CONNECTIONS):
            metrics.hits.inc(self.labels)
            return best, True
        metrics.misses.inc(self.labels)
        connection = StreamConnection(self)
        self.connections.append(connection)
        task = asyncio.get_running_loop().create_task(self._dial(connection))
        self.upstream.tasks.add(task)
        task.add_done_callback(self.upstream.tasks.discard)
        return connection, False

    async def _dial(self, connection: StreamConnection) -> None:
        upstream = self.upstream
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(upstream.options.read_timeout, 1.0)):
                await loop.create_connection(
                    lambda: connection,
                    upstream.target.host,
                    upstream.target.port,
                    ssl=upstream.tls_context if self.tls else None,
                    server_hostname=upstream.server_name if self.tls else None,
                )
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            connection.closed = True
            self.discard(connection)
            connection.ready.set_exception(UpstreamError(f"dial {self.network} {upstream.to}: {reason(exc)}"))
            return
        except asyncio.CancelledError:
            connection.closed = True
            self.discard(connection)
            connection.ready.cancel()
            raise
        connection.ready.set_result(None)

    def discard(self, connection: StreamConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)

    def sweep(self) -> None:
        """Close connections idle for longer than ``expire``."""
        now = time.monotonic()
        expire = self.upstream.options.expire
        for connection in list(self.connections):
            if connection.assigned == 0 and now - connection.used > expire and connection.ready.done():
                connection.close()
                self.discard(connection)

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.connections.clear()


class Upstream:
    """One TO of a forward: how to reach it, its connections, and its health."""

    def __init__(
        self,
        target: Target,
        options: Options,
        metrics: ForwardMetrics,
        tls_context: ssl.SSLContext | None = None,
        server_name: str = "",
    ) -> None:
        self.target = target
        self.options = options
        self.metrics = metrics
        self.to = target.address  # the ``to`` label, as CoreDNS prints it
        self.tls = target.transport == "tls"
        self.tls_context = tls_context
        self.server_name = server_name or options.tls_servername or target.host
        info = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
        self.family, _type, _proto, _name, self.sockaddr = info[0]
        self.tcp = Pool(self, tls=False)
        self.secure = Pool(self, tls=True) if self.tls else None
        self.fails = 0
        self.probe: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopped = False
        self.datagrams = Datagrams(self)
        self.loop: asyncio.AbstractEventLoop | None = None  # set by ``use_loop`` when the plugin starts
        self._to_labels = (self.to,)
        self._rcode_labels: dict[int, tuple[tuple[str, str], tuple[str, str, str]]] = {}

    def __repr__(self) -> str:
        return f"<Upstream {self.target.transport}://{self.to} fails={self.fails}>"

    @property
    def down(self) -> bool:
        """More than max_fails failed health checks in a row (never with max_fails 0)."""
        max_fails = self.options.max_fails
        return max_fails > 0 and self.fails > max_fails

    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Keep the serving loop, so that no query asks for it (a system call on 3.11)."""
        self.loop = loop
        self.datagrams.loop = loop

    def count_ignored(self, why: str) -> None:
        self.metrics.ignored.inc((self.to, why))

    # -- queries ----------------------------------------------------------------------------

    async def exchange(self, req: Request, proto: str, deadline: float) -> bytes:
        """Ask this upstream ``req`` over ``proto`` ("udp"/"tcp"; TLS upstreams always use
        TLS); the reply as received (our ID, the upstream's question bytes)."""
        loop = self.loop or asyncio.get_running_loop()
        start = loop.time()
        metrics = self.metrics
        counts = metrics.requests.values  # the counters' dicts directly: no call per query
        counts[self._to_labels] = counts.get(self._to_labels, 0.0) + 1.0
        query = req.wire
        qend = req.question.end
        timeout = min(self.options.read_timeout, deadline - start)
        if self.secure is not None:
            reply = await self._stream(self.secure, query, qend, timeout)
        elif proto == "udp":
            datagrams = self.datagrams
            conn, future = datagrams.send(query, qend, timeout)
            ok = False
            try:
                reply = await future
                ok = True
            except (OSError, TimeoutError) as exc:
                raise datagrams.failure(conn, exc) from None
            finally:
                datagrams.finish(conn, ok)
            if reply[2] & _TC:
                # Ask again over TCP: the client still gets what fits its UDP size (with
                # TC), and a cache above keeps the whole answer for the TCP retry. If TCP
                # fails, the truncated reply is still an answer: the client retries itself.
                timeout = min(self.options.read_timeout, deadline - loop.time())
                with contextlib.suppress(UpstreamError):
                    reply = await self._stream(self.tcp, query, qend, timeout)
        else:
            reply = await self._stream(self.tcp, query, qend, timeout)
        labels = self._rcode_labels.get(reply[3] & 0x0F) or self._new_rcode_labels(reply[3] & 0x0F)
        counts = metrics.responses.values
        counts[labels[0]] = counts.get(labels[0], 0.0) + 1.0
        metrics.duration.observe(labels[1], loop.time() - start)
        return reply

    def _new_rcode_labels(self, rcode: int) -> tuple[tuple[str, str], tuple[str, str, str]]:
        """The label tuples of the response metrics for one RCODE, made once."""
        text = rcode_text(rcode)
        labels = self._rcode_labels[rcode] = ((text, self.to), (PROXY_NAME, self.to, text))
        return labels

    async def _stream(self, pool: Pool, query: bytes, qend: int, timeout: float) -> bytes:
        """Exchange on a pooled connection. A reused connection the upstream had already
        closed is not the upstream's fault: try again (as CoreDNS does, for as long as
        the connection that failed was a reused one), within the same time budget."""
        loop = self.loop or asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            connection, cached = pool.acquire()
            connection.assigned += 1
            try:
                return await connection.exchange(query, qend, max(deadline - loop.time(), 0.001))
            except PeerClosed:
                if not cached or loop.time() >= deadline:
                    raise
            finally:
                connection.assigned -= 1

    # -- health ------------------------------------------------------------------------------

    def healthcheck(self) -> None:
        """Start checking this upstream in the background, unless a check already runs."""
        if self.options.max_fails == 0 or self.probe is not None or self.stopped:
            return
        self.probe = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        options = self.options
        try:
            while not self.stopped:
                if await self.check():
                    if self.down:
                        log.info("upstream %s is healthy again", self.to)
                    self.fails = 0
                    return
                self.fails += 1
                self.metrics.healthcheck_failures.inc((PROXY_NAME, self.to))
                if self.fails == options.max_fails + 1:
                    log.warning("upstream %s is down: %d health checks failed in a row", self.to, self.fails)
                await asyncio.sleep(max(options.health_check, 0.01))
        finally:
            self.probe = None

    async def check(self) -> bool:
        """One health check: any response to ``<domain> IN NS`` means the upstream is up."""
        options = self.options
        flags = wire.RD if options.health_check_rd else 0
        name = b"".join(
            len(label).to_bytes(1, "big") + label.encode() for label in options.health_check_domain.split(".") if label
        )
        query = new_id() + wire.HEADER.pack(0, flags, 1, 0, 0, 0)[2:] + name + b"\x00\x00\x02\x00\x01"
        qend = len(query)
        timeout = min(HEALTH_CHECK_TIMEOUT, options.read_timeout)
        try:
            if self.tls or options.force_tcp:
                await self._one_shot_stream(query, qend, timeout)
            else:
                await self.datagrams.exchange(query, qend, timeout, fresh=True)
        except (UpstreamError, OSError, EOFError):  # EOFError: asyncio.IncompleteReadError
            return False
        return True

    async def _one_shot_stream(self, query: bytes, qend: int, timeout: float) -> None:
        """A health check over a connection of its own, as CoreDNS's checker dials anew."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                self.target.host,
                self.target.port,
                ssl=self.tls_context if self.tls else None,
                server_hostname=self.server_name if self.tls else None,
            )
            try:
                writer.write(len(query).to_bytes(2, "big") + query)
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = await reader.readexactly(size)
            finally:
                writer.close()
        if mismatch(reply, query, qend) is not None:
            raise UpstreamError("health check reply does not match")

    # -- lifecycle ---------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        self.datagrams.sweep(now)
        self.tcp.sweep()
        if self.secure is not None:
            self.secure.sweep()

    def stop(self) -> None:
        self.stopped = True
        if self.probe is not None:
            self.probe.cancel()
        for task in list(self.tasks):
            task.cancel()
        self.datagrams.close()
        self.tcp.close()
        if self.secure is not None:
            self.secure.close()
