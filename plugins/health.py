"""health: an HTTP liveness endpoint, and a lameduck period before shutdown.

Syntax::

    health [ADDRESS] [{
        lameduck DURATION
    }]

``GET http://ADDRESS/health`` (default address ``:8080``) answers 200 with the body ``OK``
while the process serves DNS. With ``lameduck``, a shutdown (SIGTERM) first turns
/health into 503 and waits DURATION while queries are still answered, so a load
balancer or kube-proxy takes the instance out before it stops listening.

Several server blocks may name the same address: they share one HTTP server, and a
shutdown turns /health to 503 in every one of them, waiting for the longest lameduck.

Metrics, without a ``server`` label because they describe the process (CoreDNS's):
once a second the process fetches its own /health and observes how long that took in
``coredns_health_request_duration_seconds``; a fetch that fails (no connection, no
answer within 3s) counts in ``coredns_health_request_failures_total``. A slow self-check
means the event loop is falling behind its query load. The check is a plain GET over a
fresh loopback connection (no HTTP client library: the process imports none), and runs
only in the process that serves the address: with ``-workers``, worker 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.endpoints import Route, check_address, split_address
from resolver.httpserver import HTTPRequest, Response
from resolver.logs import plugin_logger
from resolver.metrics import CounterVec, HistogramVec
from resolver.plugin import Plugin, expect_args, format_duration, parse_duration, raise_unknown_option
from resolver.runtime import Runtime

log = plugin_logger("health")

DEFAULT_ADDRESS = ":8080"
DEFAULT_PORT = 8080
PATH = "/health"
PROBE_INTERVAL = 1.0  # seconds between self-checks, as in CoreDNS
PROBE_TIMEOUT = 3.0
SLOW_PROBE = 1.0  # a *local* request slower than this is worth a warning
MAX_PROBE_ANSWER = 4096  # /health answers a few bytes; more is not our endpoint
# CoreDNS's plugin.SlimTimeBuckets: 0.25ms to 2.5s, times ten each step.
SLIM_BUCKETS: tuple[float, ...] = (0.00025, 0.0025, 0.025, 0.25, 2.5)


class Health(Plugin):
    name = "health"

    def __init__(self, address: str, lameduck: float, runtime: Runtime) -> None:
        self.address = address
        self.lameduck = lameduck
        self.http = runtime.http
        metrics = runtime.metrics
        self.duration = metrics.histogram(
            "coredns_health_request_duration_seconds",
            "Histogram of the time (in seconds) each request took.",
            (),
            SLIM_BUCKETS,
        )
        self.failures = metrics.counter(
            "coredns_health_request_failures_total", "The number of times the health check failed."
        )
        self.failures.inc((), 0.0)  # exported as 0 from the start, as a Go counter without labels is
        # One self-check per address however many blocks (and configurations, across a
        # reload) name it, so the histogram counts one probe a second.
        self.probers: dict[str, Prober] = runtime.shared(self.name, dict)
        self.route: Route | None = None
        self.draining = False  # set on shutdown: /health says 503 from then on

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Health:
        args = expect_args(directive, 0, 1)
        address = check_address(args[0], directive) if args else DEFAULT_ADDRESS
        lameduck = 0.0
        for option in directive.children:
            if option.name != "lameduck":
                raise raise_unknown_option(directive, option)
            if option.block:
                raise option.error("takes no block")
            lameduck = parse_duration(expect_args(option, 1, 1)[0], option)
        return cls(address, lameduck, block.runtime)

    async def start(self) -> None:
        self.route = route = await self.http.add(self.address, PATH, self.handle, DEFAULT_PORT)
        if not self.http.serves(route):
            # A worker after the first of -workers: worker 0 serves (and checks) the address,
            # whose port this process may not even know (``:0``), and only worker 0's
            # metrics are scraped.
            return
        prober = self.probers.get(route.address)
        if prober is None:
            prober = self.probers[route.address] = Prober(
                probe_url(self.address, route.port), self.duration, self.failures
            )
        prober.users.add(self)

    async def stop(self) -> None:
        route, self.route = self.route, None
        if route is None:
            return
        prober = self.probers.get(route.address)
        if prober is not None:
            prober.users.discard(self)
            if not prober.users:
                del self.probers[route.address]
                await prober.close()
        await self.http.remove(route)

    async def before_shutdown(self) -> None:
        """Fail /health at once, then keep answering DNS for the lameduck duration.

        Every instance fails its /health, with or without lameduck: the route that
        answers on a shared address may belong to a block that has none.
        """
        if self.route is None:
            return
        self.draining = True
        if self.lameduck > 0:
            log.info("Going into lameduck mode for %s", format_duration(self.lameduck))
            await asyncio.sleep(self.lameduck)

    async def handle(self, request: HTTPRequest) -> Response:
        if self.draining:
            return Response(503)
        return Response.text("OK")


class Prober:
    """The once-a-second self-check of one health address (CoreDNS's "overloaded" loop)."""

    def __init__(self, url: str, duration: HistogramVec, failures: CounterVec) -> None:
        self.url = url
        self.duration = duration
        self.failures = failures
        self.interval = PROBE_INTERVAL
        self.users: set[Health] = set()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.probe()

    async def probe(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await fetch(self.url)
        except (OSError, ValueError, EOFError) as exc:
            self._failed(loop.time() - started, str(exc) or type(exc).__name__)
            return
        except TimeoutError:
            self._failed(loop.time() - started, f"no answer within {format_duration(PROBE_TIMEOUT)}")
            return
        # A 503 during lameduck is the endpoint working as meant, not a failed check.
        elapsed = loop.time() - started
        self.duration.observe((), elapsed)
        if elapsed > SLOW_PROBE:
            log.warning('Local health request to "%s" took more than 1s: %s', self.url, format_duration(elapsed))

    def _failed(self, elapsed: float, why: str) -> None:
        self.duration.observe((), elapsed)
        self.failures.inc(())
        log.warning('Local health request to "%s" failed: %s', self.url, why)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def fetch(url: str) -> int:
    """GET ``url`` (``http://HOST:PORT/PATH``) on a new connection; its status code.

    Raises OSError when the connection fails, ValueError when what comes back is not an
    HTTP answer, EOFError when it is cut short.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = b""
        while len(answer) < MAX_PROBE_ANSWER:  # to the end (we asked to close), as a client reads
            chunk = await reader.read(MAX_PROBE_ANSWER - len(answer))
            if not chunk:
                break
            answer += chunk
    finally:
        writer.close()
    if not answer:
        raise EOFError("connection closed without an answer")
    status_line = answer.partition(b"\r\n")[0].split(b" ")
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        raise ValueError("not an HTTP answer")
    return int(status_line[1])


def probe_url(address: str, port: int) -> str:
    """The URL of our own /health: a wildcard address is fetched over loopback."""
    host, _port = split_address(address, DEFAULT_PORT)
    if host in (None, "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{PATH}"
