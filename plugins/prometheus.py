"""prometheus: count every query and serve the counts to Prometheus at ``/metrics``.

Syntax::

    prometheus [ADDRESS] [{
        runtime_metrics
    }]

ADDRESS is ``HOST:PORT`` (``:9153``, ``localhost:9153``, ``[::1]:9153``); the default is
``localhost:9153``. The path is always ``/metrics``. Several server blocks may name the
same address: they share one HTTP server, and every block's series are on it (the metric
families belong to the process, not to a block). ``runtime_metrics`` (CoreDNS's switch for
Go runtime metrics) is accepted and does nothing here; CoreDNS's ``tls`` is not supported.

Per query that passes through the plugin (CoreDNS's names, labels and buckets)::

    coredns_dns_requests_total{server,zone,view,proto,family,type}
    coredns_dns_responses_total{server,zone,view,rcode,plugin}
    coredns_dns_request_duration_seconds{server,zone,view}
    coredns_dns_request_size_bytes{server,zone,view,proto}
    coredns_dns_response_size_bytes{server,zone,view,proto}
    coredns_dns_do_requests_total{server,zone,view}

and for the process: ``coredns_build_info{version,revision,goversion}``,
``coredns_panics_total``, ``coredns_reload_failed_total``,
``coredns_plugin_enabled{server,zone,view,name}``, ``process_*`` and ``python_*``, plus
``corefile_resolver_rejected_packets_total{reason}`` for packets the server turned away
before any plugin saw them (reason ``short``, ``response``, ``formerr``, ``notimp``,
``refused``, ``tcp_rejected``). A query a plugin chose not to answer (reply ``None``) is
counted as a request with no response.
"""

from __future__ import annotations

import functools
import platform
from bisect import bisect_left
from collections.abc import Callable
from time import perf_counter
from typing import Any

from dnslib import DNSError

import resolver
from resolver import wire
from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.dnsnames import rcode_label as rcode_name
from resolver.endpoints import Route, check_address
from resolver.httpserver import HTTPRequest, Response
from resolver.metrics import DURATION_BUCKETS, SIZE_BUCKETS, HistogramVec, Labels
from resolver.plugin import Handler, Plugin, expect_args, raise_unknown_option
from resolver.reply import Reply
from resolver.request import Request
from resolver.runtime import Runtime
from resolver.server import server_label

DEFAULT_ADDRESS = "localhost:9153"
DEFAULT_PORT = 9153
PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
VIEW = ""  # there is no view plugin: CoreDNS leaves the label empty then
MAX_SERIES_CACHE = 4096
MAX_MESSAGE = 65535  # a query never exceeds it; a plugin's reply might, before truncation

# Query types CoreDNS names in the ``type`` label (plugin/metrics/vars/monitor.go); any
# other type is counted as "other" so a client cannot grow the label set.
MONITORED_TYPES: dict[int, str] = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    43: "DS",
    46: "RRSIG",
    47: "NSEC",
    48: "DNSKEY",
    50: "NSEC3",
    64: "SVCB",
    65: "HTTPS",
    251: "IXFR",
    252: "AXFR",
    255: "ANY",
}

# Runtime.stats field -> ``reason`` label of corefile_resolver_rejected_packets_total.
DROP_REASONS: dict[str, str] = {
    "dropped_short": "short",
    "dropped_responses": "response",
    "formerr": "formerr",
    "notimp": "notimp",
    "refused": "refused",
    "badvers": "badvers",
    "tcp_rejected": "tcp_rejected",
}


class Prometheus(Plugin):
    name = "prometheus"

    def __init__(self, address: str, runtime: Runtime) -> None:
        self.address = address
        self.runtime = runtime
        self.route: Route | None = None
        #: (server, zone, transport, qtype, address length) -> what such a query updates.
        self._series: dict[SeriesKey, Series] = {}
        #: coredns_plugin_enabled series of this block, filled in ``connect``.
        self.enabled: dict[Labels, float] = {}
        self._declare(runtime)
        self._request_counts = self.requests.values
        self._response_counts = self.responses.values
        self._duration_bounds = self.duration.bounds
        self._request_slot = size_slots(self.request_size.bounds)
        self._response_slot = size_slots(self.response_size.bounds)
        self._process: Any = None  # process_* and python_*: made on the first scrape

    def _declare(self, runtime: Runtime) -> None:
        metrics = runtime.metrics
        self.requests = metrics.counter(
            "coredns_dns_requests_total",
            "Counter of DNS requests made per zone, protocol and family.",
            ("server", "zone", "view", "proto", "family", "type"),
        )
        self.responses = metrics.counter(
            "coredns_dns_responses_total",
            "Counter of response status codes.",
            ("server", "zone", "view", "rcode", "plugin"),
        )
        self.do_requests = metrics.counter(
            "coredns_dns_do_requests_total",
            "Counter of DNS requests with DO bit set per zone.",
            ("server", "zone", "view"),
        )
        self.duration = metrics.histogram(
            "coredns_dns_request_duration_seconds",
            "Histogram of the time (in seconds) each request took per zone.",
            ("server", "zone", "view"),
            DURATION_BUCKETS,
        )
        self.request_size = metrics.histogram(
            "coredns_dns_request_size_bytes",
            "Size of the EDNS0 UDP buffer in bytes (64K for TCP) per zone and protocol.",
            ("server", "zone", "view", "proto"),
            SIZE_BUCKETS,
        )
        self.response_size = metrics.histogram(
            "coredns_dns_response_size_bytes",
            "Size of the returned response in bytes.",
            ("server", "zone", "view", "proto"),
            SIZE_BUCKETS,
        )
        self.plugin_enabled = metrics.gauge(
            "coredns_plugin_enabled",
            "A metric that indicates whether a plugin is enabled on per server and zone basis.",
            ("server", "zone", "view", "name"),
        )
        build_info = metrics.gauge(
            "coredns_build_info",
            "A metric with a constant '1' value labeled by version, revision, and goversion from which "
            "CoreDNS was built.",
            ("version", "revision", "goversion"),
        )
        build_info.set((resolver.__version__, "", f"python{platform.python_version()}"), 1)
        # The process counters live in runtime.stats (the core counts them without knowing
        # about metrics); they are copied into these families on every scrape.
        self.panics = metrics.counter("coredns_panics_total", "A metrics that counts the number of panics.")
        self.reload_failed = metrics.counter(
            "coredns_reload_failed_total", "Counter of the number of failed reload attempts."
        )
        self.dropped = metrics.counter(
            "corefile_resolver_rejected_packets_total",
            "Counter of packets the server answered or dropped before any plugin saw them, per reason.",
            ("reason",),
        )

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Prometheus:
        args = expect_args(directive, 0, 1)
        address = check_address(args[0], directive) if args else DEFAULT_ADDRESS
        for option in directive.children:
            if option.name == "runtime_metrics":
                expect_args(option, 0, 0)
            elif option.name == "tls":
                raise option.error("prometheus: tls is not supported; serve /metrics over plain HTTP")
            else:
                raise raise_unknown_option(directive, option)
        return cls(address, block.runtime)

    def connect(self, block: ServerBlock) -> None:
        # Only plugins that answer queries are listed, as CoreDNS lists only its handlers
        # (bind and reload are not); here that means those that override ``serve``.
        names = [plugin.name for plugin in block.plugins if type(plugin).serve is not Plugin.serve]
        for host in block.listen_hosts:
            for key in block.keys:
                server = server_label(host, key.port)
                for name in names:
                    self.enabled[(server, key.zone, VIEW, name)] = 1.0

    async def start(self) -> None:
        self.route = await self.runtime.http.add(self.address, PATH, self._scrape, DEFAULT_PORT)
        # Registered per instance: the old configuration's series vanish when its plugin
        # stops after a reload, and a configuration that failed to start leaves nothing.
        self.plugin_enabled.add_callback(self, lambda: self.enabled)

    async def stop(self) -> None:
        self.plugin_enabled.remove_callback(self)
        if self.route is not None:
            route, self.route = self.route, None
            await self.runtime.http.remove(route)

    @property
    def port(self) -> int:
        """The port /metrics is served on (useful when ADDRESS asked for port 0)."""
        return self.route.port if self.route is not None else 0

    # -- per query ---------------------------------------------------------------------

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        start = perf_counter()
        try:
            reply = await next(req)
        except Exception as exc:
            self._count_failure(req, perf_counter() - start, exc)
            raise
        self.observe(req, reply, perf_counter() - start)
        return reply

    def observe(self, req: Request, reply: Reply | None, elapsed: float) -> None:
        """Count one answered query: ``serve`` after the chain, and the server's fast path
        (a cache hit answered without running the chain: ``resolver.server.fast_path``)."""
        # What one kind of query updates (label tuples, the histograms' slot lists) is
        # looked up once per kind, not per query. The length of the client address tuple
        # stands for its family (2 items for IPv4, 4 for IPv6; the server's IPv6 sockets
        # are IPv6-only, so no IPv4-mapped address arrives on them).
        question = req.question
        key = (req.server, req.zone, req.transport, question.qtype, len(req.client))
        series = self._series.get(key) or self._new_series(key, req)
        request_labels, zone_labels, duration, request_size, response_size, responses = series
        counts = self._request_counts
        counts[request_labels] = counts.get(request_labels, 0.0) + 1.0
        duration[bisect_left(self._duration_bounds, elapsed)] += 1.0
        duration[-1] += elapsed
        size = len(req.wire)
        request_size[self._request_slot[size]] += 1.0
        request_size[-1] += size
        if question.do:
            self.do_requests.inc(zone_labels)
        if reply is not None:
            data = reply.wire
            size = len(data)
            response_size[self._response_slot[size] if size <= MAX_MESSAGE else -2] += 1.0
            response_size[-1] += size
            # Reply.rcode of finished bytes is the header's (two calls fewer per query).
            outcome = (data[3] & 0x0F if reply.parsed is None else reply.rcode, reply.plugin)
            labels = responses.get(outcome)
            if labels is None:
                labels = responses[outcome] = (*zone_labels, rcode_name(outcome[0]), outcome[1])
            counts = self._response_counts
            counts[labels] = counts.get(labels, 0.0) + 1.0

    def tally(self, req: Request, reply: Reply) -> Callable[[float], None]:
        """For the server's memo (``resolver.memo``): ``observe(req, reply, elapsed)``
        again for repeats of the same query bytes answered with the same bytes, with
        every label and histogram slot looked up now, once."""
        question = req.question
        key = (req.server, req.zone, req.transport, question.qtype, len(req.client))
        request_labels, zone_labels, duration, request_size, response_size, responses = self._series.get(
            key
        ) or self._new_series(key, req)
        asked = len(req.wire)
        asked_slot = self._request_slot[asked]
        data = reply.wire
        answered = len(data)
        answered_slot = self._response_slot[answered] if answered <= MAX_MESSAGE else -2
        outcome = (data[3] & 0x0F if reply.parsed is None else reply.rcode, reply.plugin)
        response_labels = responses.get(outcome) or (*zone_labels, rcode_name(outcome[0]), outcome[1])
        request_counts, response_counts = self._request_counts, self._response_counts
        bounds = self._duration_bounds
        do_requests = self.do_requests if question.do else None

        def count(elapsed: float) -> None:
            request_counts[request_labels] = request_counts.get(request_labels, 0.0) + 1.0
            duration[bisect_left(bounds, elapsed)] += 1.0
            duration[-1] += elapsed
            request_size[asked_slot] += 1.0
            request_size[-1] += asked
            if do_requests is not None:
                do_requests.inc(zone_labels)
            response_size[answered_slot] += 1.0
            response_size[-1] += answered
            response_counts[response_labels] = response_counts.get(response_labels, 0.0) + 1.0

        return count

    def _new_series(self, key: SeriesKey, req: Request) -> Series:
        if len(self._series) >= MAX_SERIES_CACHE:
            self._series.clear()  # only a lookup cache: a client cycling query types cannot grow it
        server, zone, proto, qtype, _length = key
        zone_labels = (server, zone, VIEW)
        by_proto = (*zone_labels, proto)
        series = self._series[key] = (
            (*zone_labels, proto, str(req.family), MONITORED_TYPES.get(qtype, "other")),
            zone_labels,
            slots_of(self.duration, zone_labels),
            slots_of(self.request_size, by_proto),
            slots_of(self.response_size, by_proto),
            {},
        )
        return series

    def _count_failure(self, req: Request, elapsed: float, exc: Exception) -> None:
        """A plugin raised: the server answers SERVFAIL (FORMERR for unparseable input), so
        the request and that response are counted; no plugin wrote it, hence plugin=""."""
        zone_labels = (req.server, req.zone, VIEW)
        self.requests.inc((*zone_labels, req.transport, str(req.family), MONITORED_TYPES.get(req.qtype, "other")))
        self.duration.observe(zone_labels, elapsed)
        self.request_size.observe((*zone_labels, req.transport), len(req.wire))
        if req.do:
            self.do_requests.inc(zone_labels)
        failed = wire.FORMERR if isinstance(exc, DNSError) else wire.SERVFAIL
        self.responses.inc((*zone_labels, rcode_name(failed), ""))

    # -- scrape ------------------------------------------------------------------------

    async def _scrape(self, request: HTTPRequest) -> Response:
        # Rendered on the event loop, not in a thread: gauge callbacks of other plugins
        # read structures the loop mutates, and a scrape every few seconds costs little.
        # (HEAD renders too: its Content-Length must be the body's.)
        from prometheus_client import generate_latest

        self.sync_process_counters()
        body = self.runtime.metrics.render() + generate_latest(self._process_registry())
        return Response(200, body, CONTENT_TYPE)

    def _process_registry(self) -> Any:
        """process_* and python_* are computed on scrape from /proc and the interpreter; a
        registry of our own keeps them out of the shared families (no name clashes).
        Made on the first scrape: prometheus-client is not imported at startup."""
        if self._process is None:
            from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

            registry = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
            self._process = registry
        return self._process

    def sync_process_counters(self) -> None:
        """Copy the core's counters (``runtime.stats``) into their counter families."""
        stats = self.runtime.stats
        self.panics.values[()] = float(stats.panics)
        self.reload_failed.values[()] = float(stats.reloads_failed)
        values = self.dropped.values
        for field, reason in DROP_REASONS.items():
            values[(reason,)] = float(getattr(stats, field))


SeriesKey = tuple[str, str, str, int, int]  # server, zone, transport, qtype, client address length
# What one kind of query updates: requests_total labels, per-zone labels, the slot lists of
# the duration, request size and response size histograms, and (rcode, plugin) -> labels.
Series = tuple[Labels, Labels, list[float], list[float], list[float], dict[tuple[int, str], Labels]]


def slots_of(histogram: HistogramVec, labels: Labels) -> list[float]:
    """The histogram's slot list for ``labels`` (HistogramVec's layout: one count per
    bucket, the +Inf count, the sum), created as ``observe`` creates it. Holding it lets
    the hot path bump a bucket without a method call and a dict lookup per histogram."""
    slots = histogram.series.get(labels)
    if slots is None:
        slots = histogram.series[labels] = [0.0] * (len(histogram.bounds) + 2)
    return slots


@functools.cache
def size_slots(bounds: tuple[float, ...]) -> bytes:
    """For every message size 0..65535, the index of its histogram slot (what bisect_left
    over ``bounds`` gives): a table lookup per query instead of a bisection."""
    table = bytearray()
    for index, bound in enumerate(bounds):
        upto = min(int(bound), MAX_MESSAGE)  # sizes up to and including the bound
        if upto >= len(table):
            table.extend([index] * (upto + 1 - len(table)))
    table.extend([len(bounds)] * (MAX_MESSAGE + 1 - len(table)))
    return bytes(table)
