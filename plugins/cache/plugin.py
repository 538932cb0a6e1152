"""The cache plugin: the hit path answers from stored bytes; misses learn from upstream."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from plugins.cache.clock import Clock, TickingClock
from plugins.cache.config import MIN_TTL, CacheConfig, parse
from plugins.cache.message import TYPE_AXFR, TYPE_IXFR, Analysis, analyze, question_matches, without_opt_options
from plugins.cache.store import DENIAL, KIND_NAMES, SUCCESS, Entry, Store
from resolver import wire
from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.logs import plugin_logger
from resolver.metrics import Labels, Metrics
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request
from resolver.wire import WireError

log = plugin_logger("cache")

VIEW = ""  # there is no view plugin: CoreDNS leaves the label empty then
_CD = 0x10
_AD = 0x20
_HEAD_INTERN_LIMIT = 4096


class Cache(Plugin):
    name = "cache"

    def __init__(
        self, config: CacheConfig, metrics: Metrics, clock: Clock | None = None, in_zone: bool = False
    ) -> None:
        self.config = config
        #: Where time comes from; tests put a clock they move by hand here.
        self.clock: Clock = clock if clock is not None else TickingClock()
        self.store = Store(config.success_capacity, config.denial_capacity)
        # The hit path reads these directly.
        self.tables = self.store.tables
        self.dependent = self.store.dependent
        self.prefetch = config.prefetch
        self.stale = config.stale
        #: None when every query that reaches the cache is inside its zones (no check).
        self.zones: frozenset[bytes] | None = None if in_zone else _zone_set(config.zones)
        self.success_disabled = _zone_set(config.success_disabled) if config.success_disabled else None
        self.denial_disabled = _zone_set(config.denial_disabled) if config.denial_disabled else None
        self.some_disabled = bool(self.success_disabled or self.denial_disabled)
        self.zones_label = config.zones_label
        self._labels: dict[str, tuple[Labels, Labels, Labels]] = {}
        self._servers: dict[str, None] = {}  # server labels that stored entries (for the gauge)
        self._heads: dict[tuple[bytes, bool], tuple[bytes, bytes, bytes, bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._declare(metrics)

    def _declare(self, metrics: Metrics) -> None:
        by_type = ("server", "type", "zones", "view")
        by_zone = ("server", "zones", "view")
        self.entries_gauge = metrics.gauge("coredns_cache_entries", "The number of elements in the cache.", by_type)
        self.requests = metrics.counter("coredns_cache_requests_total", "The count of cache requests.", by_zone)
        self.hits = metrics.counter("coredns_cache_hits_total", "The count of cache hits.", by_type)
        self.misses = metrics.counter(
            "coredns_cache_misses_total",
            "The count of cache misses. Deprecated, derive misses from cache hits/requests counters.",
            by_zone,
        )
        self.prefetches = metrics.counter(
            "coredns_cache_prefetch_total", "The number of times the cache has prefetched a cached item.", by_zone
        )
        self.drops = metrics.counter(
            "coredns_cache_drops_total",
            "The number responses that are not cached, because the reply is malformed.",
            by_zone,
        )
        self.served_stale = metrics.counter(
            "coredns_cache_served_stale_total", "The number of requests served from stale cache entries.", by_zone
        )
        self.evictions = metrics.counter("coredns_cache_evictions_total", "The count of cache evictions.", by_type)
        self._request_counts = self.requests.values
        self._hit_counts = self.hits.values
        self._miss_counts = self.misses.values

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Cache:
        config = parse(directive, block)
        # Routing only sends names inside the block's zones here: if the cache covers all
        # of them, no query needs a zone check.
        in_zone = "." in config.zones or set(block.zones) <= set(config.zones)
        return cls(config, block.runtime.metrics, in_zone=in_zone)

    async def start(self) -> None:
        self.clock.start()
        self.entries_gauge.add_callback(self, self._entry_counts)

    async def stop(self) -> None:
        self.clock.stop()
        self.entries_gauge.remove_callback(self)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    # -- the hit path --------------------------------------------------------------------

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        if req.declined_by is not self:  # else the server's fast path just asked: a miss
            reply = self.serve_at_once(req, next)
            if reply is not None:
                return reply
        end, qtype, _qclass, edns, _udp_size, do, version = req.question
        if version:
            return await next(req)  # never conflated with version 0 (the server answers BADVERS)
        data = req.wire
        qkey = data[12:end].lower()
        variant = (data[3] & _CD) >> 4 | do << 1 | edns << 2
        entry = self._lookup(req, qkey, variant)
        if entry is not None and entry.qtype == qtype:
            now = self.clock.now
            if now < entry.expires:
                # Stored since the fast path looked (Python 3.11 runs this a loop pass later).
                reply = self.serve_at_once(req, next)
                if reply is not None:
                    return reply
            if self.stale and now < entry.expires + self.stale:
                return await self._expired(req, next, entry, qkey, variant)
            self.store.remove(entry)
        # A miss, in this frame: a coroutine of its own would cost a frame on every step.
        if self.zones is not None and not in_zones(qkey[:-4], self.zones):
            return await next(req)
        labels = self._labels.get(req.server) or self._new_labels(req.server)
        requested = labels[0]
        counts = self._request_counts
        counts[requested] = counts.get(requested, 0.0) + 1.0
        counts = self._miss_counts
        counts[requested] = counts.get(requested, 0.0) + 1.0
        reply = await next(req)
        if reply is None:
            return None
        return self._learn(req, reply, qkey, variant)[0]

    def serve_at_once(self, req: Request, next: Handler) -> Reply | None:
        """The reply to a fresh hit, counted as ``serve`` counts it; None (nothing
        counted) for anything that needs more: a miss, an expired entry, EDNS version > 0.

        ``serve`` starts here, and the server calls it directly, without a coroutine or
        a Task, when the plugins before the cache can observe a reply synchronously
        (``resolver.server.fast_path``): a hit then costs a few dict lookups."""
        end, qtype, _qclass, edns, _udp_size, do, version = req.question  # one unpack, not five lookups
        if version:
            return None
        data = req.wire
        # The key: the question's bytes with the name lower-cased. Lower-casing QTYPE and
        # QCLASS too is harmless because the entry's qtype is compared below (type 65 is
        # byte 0x41, 'A'); a length octet is never a letter.
        qkey = data[12:end].lower()
        variant = (data[3] & _CD) >> 4 | do << 1 | edns << 2
        entry = self._lookup(req, qkey, variant)
        if entry is None or entry.qtype != qtype:
            return None
        now = self.clock.now
        if now >= entry.expires:
            return None
        if entry.stamp != now:
            self._retime(entry, now)
        labels = self._labels.get(req.server) or self._new_labels(req.server)
        counts = self._request_counts
        counts[labels[0]] = counts.get(labels[0], 0.0) + 1.0
        hit = labels[1 + entry.kind]
        counts = self._hit_counts
        counts[hit] = counts.get(hit, 0.0) + 1.0
        if self.prefetch:
            self._count_popularity(req, next, entry, now)
        # The client's ID and question (its 0x20 letter case), the stored rest.
        head = entry.heads[(data[2] & 1) | (data[3] & _AD) >> 4]
        return Reply(wire=b"".join((data[:2], head, data[12:end], entry.tail)), plugin="cache")

    def replay(self, req: Request, reply: Reply) -> Callable[[bytes], bytes | None] | None:
        """For the server's memo (``resolver.memo``): a function that answers ``req``'s
        bytes again from the entry that just answered them, counted as ``serve_at_once``
        counts a hit, or None once that entry expired or left the cache. None (nothing to
        remember) when hits must do more than that: prefetch counts each hit, and answers
        that depend on the client are not the same for the same bytes."""
        if self.prefetch or reply.plugin != "cache":
            return None
        end, qtype, _qclass, edns, _udp_size, do, version = req.question
        data = req.wire
        qkey = data[12:end].lower()
        if version or (self.dependent and qkey[:-4] in self.dependent):
            return None
        entry = self.tables[(data[3] & _CD) >> 4 | do << 1 | edns << 2].get(qkey)
        if entry is None or entry.qtype != qtype:
            return None
        labels = self._labels.get(req.server) or self._new_labels(req.server)
        requested, hit = labels[0], labels[1 + entry.kind]
        request_counts, hit_counts = self._request_counts, self._hit_counts
        clock, retime = self.clock, self._retime
        # The answer after the ID is the same bytes until the TTLs move (a new tail).
        front = entry.heads[(data[2] & 1) | (data[3] & _AD) >> 4] + data[12:end]
        tail = entry.tail
        body = front + tail

        def replay(query: bytes) -> bytes | None:
            nonlocal tail, body
            now = clock.now
            if now >= entry.expires or not entry.live:
                return None
            if entry.stamp != now:
                retime(entry, now)
            if entry.tail is not tail:
                tail = entry.tail
                body = front + tail
            request_counts[requested] = request_counts.get(requested, 0.0) + 1.0
            hit_counts[hit] = hit_counts.get(hit, 0.0) + 1.0
            return query[:2] + body

        return replay

    def _lookup(self, req: Request, qkey: bytes, variant: int) -> Entry | None:
        """The entry that would answer ``req`` (``qkey``, ``variant``): the shared table's,
        or for a name whose answers depend on the client, the client's own."""
        dependent = self.dependent
        if dependent and qkey[:-4] in dependent:
            return self._private(req, qkey, variant)
        return self.tables[variant].get(qkey)

    def _private(self, req: Request, qkey: bytes, variant: int) -> Entry | None:
        """The entry a client sees for a name whose answers depend on the client."""
        group = self.store.view(qkey[:-4], req.remote_ip, self.clock.now)
        return group.entries.get((variant, qkey)) if group is not None else None

    def _retime(self, entry: Entry, now: int) -> None:
        """Write the TTL left (0 once expired; the stored TTL with keepttl) into every record."""
        ttl = entry.expires - now
        if ttl <= 0:
            ttl = 0
        elif self.config.keepttl:
            ttl = entry.duration
        entry.stamp = now
        if ttl == entry.written:
            return  # every record says so already (a fresh answer; keepttl)
        packed = ttl.to_bytes(4, "big")
        tail = bytearray(entry.tail)
        for offset in entry.offsets:
            tail[offset : offset + 4] = packed
        entry.tail = bytes(tail)
        entry.written = ttl

    def _new_labels(self, server: str) -> tuple[Labels, Labels, Labels]:
        labels = (
            (server, self.zones_label, VIEW),
            (server, KIND_NAMES[SUCCESS], self.zones_label, VIEW),
            (server, KIND_NAMES[DENIAL], self.zones_label, VIEW),
        )
        self._labels[server] = labels
        return labels

    # -- expired entries: serve_stale ------------------------------------------------------

    async def _expired(self, req: Request, next: Handler, entry: Entry, qkey: bytes, variant: int) -> Reply | None:
        """An expired entry that serve_stale may still serve (``serve`` checked)."""
        labels = self._labels.get(req.server) or self._new_labels(req.server)
        self.requests.inc(labels[0])
        self.hits.inc(labels[1 + entry.kind])
        if self.config.verify:
            # verify: upstream first; the expired entry only when upstream fails.
            failure: Exception | None = None
            reply: Reply | None = None
            try:
                reply = await next(req)
            except Exception as exc:
                failure = exc
            if reply is not None and self._refreshes(reply, req):
                return self._learn(req, reply, qkey, variant)[0]
            if reply is not None and _truncated(reply):
                return reply  # upstream is up (a TC answer is an answer): no stale data
            if not entry.live:
                # Removed while upstream was asked (a fresh NXDOMAIN for the name, say):
                # serving it now could contradict what the cache holds.
                if failure is not None:
                    raise failure
                return reply
        elif not entry.refreshing:
            self._refresh_later(next, [(_copy_request(req), entry)])
        self.served_stale.inc(labels[0])
        now = self.clock.now
        if entry.stamp != now:
            self._retime(entry, now)
        head = entry.heads[(req.wire[2] & 1) | (req.wire[3] & _AD) >> 4]
        return Reply(wire=b"".join((req.wire[:2], head, req.wire[12 : req.question.end], entry.tail)), plugin="cache")

    @staticmethod
    def _refreshes(reply: Reply, req: Request) -> bool:
        """Whether an upstream reply may replace an entry (RFC 8767 4: NOERROR or NXDOMAIN,
        complete, for the same question)."""
        try:
            data = reply.wire
        except Exception:
            return False
        if len(data) < wire.HEADER_SIZE:
            return False
        return (
            reply.rcode in (wire.NOERROR, wire.NXDOMAIN)
            and not data[2] & 0x02
            and bool(question_matches(data, req.wire, req.question.end))
        )

    # -- misses ------------------------------------------------------------------------

    def _learn(
        self, req: Request, reply: Reply, qkey: bytes, variant: int, align: bool = True
    ) -> tuple[Reply, Entry | None]:
        """Apply a fresh upstream reply to the cache; return what to send the client."""
        try:
            data = reply.wire
        except Exception:
            return reply, None  # the server turns an unpackable reply into SERVFAIL
        if not reply.cacheable:
            return reply, None
        now = self.clock.now
        name = qkey[:-4]
        query = req.wire
        end = req.question.end
        # A client-specific answer makes the name dependent at once (its shared entries go),
        # even when it is not stored; the window grows to the entry's own life below.
        client = None
        if reply.client_specific or self.dependent:
            client = self.store.target(name, req.remote_ip, reply.client_specific, now, MIN_TTL + self.stale)
        analysis = self._analyze(data, query, end, req.server)
        if analysis is None:
            return reply, None
        if analysis.opt_options is not None:
            if analysis.opt_options[1] != len(data):
                # Cutting options out of an OPT that is not the last record would move the
                # records after it and break their compression pointers: do not keep it.
                return reply, None
            data = without_opt_options(data, analysis.opt_options)
            analysis = analyze(data, end)
        # A name the cache holds nothing for (most misses) has nothing to purge or align.
        known = self.store.group(name, client) is not None
        if known:
            self.store.purge(name, client, analysis.rcode)
        qtype = req.question.qtype
        kind, duration = self._classify(analysis, qtype)
        if kind is None or duration <= 0 or (self.some_disabled and self._disabled(name, kind)):
            return reply, None
        entry = Entry(
            qkey,
            variant,
            qtype,
            analysis.rcode,
            kind,
            self._heads.get((data[2:12], bool(variant & 2))) or self._heads_of(data, bool(variant & 2)),
            data[end:],
            tuple([offset - end for offset in analysis.ttl_offsets]),
            now + duration,
            duration,
        )
        if analysis.min_ttl == analysis.max_ttl:
            entry.written = analysis.min_ttl  # the upstream's TTLs, all alike: often just right
        for victim in self.store.add(entry, client):
            labels = self._labels.get(req.server) or self._new_labels(req.server)
            self.evictions.inc(labels[1 + victim.kind])
        if align and known:
            self.store.align(entry, now)
        if reply.client_specific:
            self.store.hold(name, now + entry.lifetime + self.stale)
        self._retime(entry, now)  # nothing to rewrite when the upstream's TTLs are the entry's
        self._servers[req.server] = None
        head = entry.heads[(query[2] & 1) | (query[3] & _AD) >> 4]
        packed = b"".join((query[:2], head, query[12:end], entry.tail))
        return reply.rewired(packed), entry

    def _analyze(self, data: bytes, query: bytes, end: int, server: str) -> Analysis | None:
        """The reply's records, or None (counted as a drop) when its question is not the
        query's or it is malformed; error replies that are never cached are not drops."""
        try:
            if question_matches(data, query, end):
                return analyze(data, end)
        except (WireError, IndexError):
            pass
        if len(data) >= 4 and data[3] & 0x0F in (wire.NOERROR, wire.NXDOMAIN, wire.SERVFAIL):
            labels = self._labels.get(server) or self._new_labels(server)
            self.drops.inc(labels[0])
        return None

    def _classify(self, analysis: Analysis, qtype: int) -> tuple[int | None, int]:
        """(SUCCESS or DENIAL or None, seconds to keep it): CoreDNS's classification, with
        RFC 2308's negative TTL and NXDOMAIN/NODATA without SOA kept for the minimum TTL."""
        config = self.config
        if analysis.truncated or qtype in (TYPE_AXFR, TYPE_IXFR):
            return None, 0
        rcode = analysis.rcode
        if rcode == wire.NOERROR and (analysis.answers or (analysis.delegation and analysis.soa_ttl is None)):
            ttl = analysis.min_ttl if analysis.min_ttl is not None else MIN_TTL
            return SUCCESS, _clamp(ttl, config.success_min_ttl, config.success_ttl)
        if rcode == wire.NOERROR or (rcode == wire.NXDOMAIN and not analysis.answers):
            if analysis.soa_ttl is None:
                return DENIAL, _clamp(config.denial_min_ttl, config.denial_min_ttl, config.denial_ttl)
            ttl = analysis.soa_ttl if analysis.min_ttl is None else min(analysis.soa_ttl, analysis.min_ttl)
            return DENIAL, _clamp(ttl, config.denial_min_ttl, config.denial_ttl)
        if rcode == wire.SERVFAIL:
            return DENIAL, config.servfail_ttl
        return None, 0  # REFUSED, FORMERR, NOTIMP, NXDOMAIN with records, extended RCODEs

    def _disabled(self, name: bytes, kind: int) -> bool:
        zones = self.success_disabled if kind == SUCCESS else self.denial_disabled
        return zones is not None and in_zones(name, zones)

    def _heads_of(self, data: bytes, do: bool) -> tuple[bytes, bytes, bytes, bytes]:
        """Header bytes 2..12 for each (RD, AD) of the asking client: RD is copied from the
        query; AD is kept only for a client that set DO or AD (RFC 6840 5.7-5.8), as CoreDNS."""
        key = (data[2:12], do)
        heads = self._heads.get(key)
        if heads is None:
            high, low, counts = data[2] & ~0x01, data[3], data[4:12]
            variants = []
            for index in range(4):
                keep_ad = do or index & 2
                variants.append(bytes((high | (index & 1), low if keep_ad else low & ~_AD)) + counts)
            heads = (variants[0], variants[1], variants[2], variants[3])
            if len(self._heads) >= _HEAD_INTERN_LIMIT:
                self._heads.clear()
            self._heads[key] = heads
        return heads

    # -- prefetch and background refreshes ---------------------------------------------

    def _count_popularity(self, req: Request, next: Handler, entry: Entry, now: int) -> None:
        """CoreDNS's prefetch: AMOUNT hits with no gap of DURATION or more make an entry
        popular; a popular entry is refreshed once its TTL falls to PERCENTAGE of the
        original (at the latest in its last second)."""
        if now - entry.last > self.config.prefetch_duration:
            entry.hits = 1
        else:
            entry.hits += 1
        entry.last = now
        if entry.hits < self.prefetch or entry.refreshing:
            return
        # Of the lifetime it really has: an A cut down to its AAAA's expiry (align) would
        # otherwise sit inside the window for good and be refreshed on every hit.
        threshold = math.ceil(self.config.prefetch_percentage * entry.lifetime / 100)
        if entry.expires - now > threshold:
            return
        work = [(_copy_request(req), entry)]
        # Its A/AAAA sibling is refreshed with it: they share one expiry, and a refreshed
        # A would otherwise be held back to the old AAAA's expiry.
        sibling = self.store.sibling(entry)
        if sibling is not None and sibling.expires > now and not sibling.refreshing:
            work.append((_copy_request(req, sibling.qtype), sibling))
        labels = self._labels.get(req.server) or self._new_labels(req.server)
        self.prefetches.inc(labels[0])
        self._refresh_later(next, work)

    def _refresh_later(self, next: Handler, work: list[tuple[Request, Entry]]) -> None:
        for _req, entry in work:
            entry.refreshing = True
        task = asyncio.get_running_loop().create_task(self._refresh(next, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, next: Handler, work: list[tuple[Request, Entry]]) -> None:
        """Ask upstream again for expiring or expired entries; only NOERROR and NXDOMAIN
        replace them (a failed refresh leaves the entry as it is)."""
        try:
            replies = await asyncio.gather(*(self._ask(next, req) for req, _entry in work))
            fresh: list[Entry] = []
            for (req, old), reply in zip(work, replies, strict=True):
                # A refresh is asked on behalf of whoever hit the entry. For a shared entry,
                # an answer specific to that client must not turn the name private (the
                # client would then see the other rcode for its next type). For a client's
                # private entry still stored it is what the entry was: it replaces it
                # (dropped, the entry would stay stale and each stale hit would ask
                # upstream again). Once the entry is gone (the name's window lapsed and
                # the name may be shared again) it is dropped, as for a shared entry.
                private = old.live and old.group is not None and old.group.client is not None
                if reply is None or (reply.client_specific and not private) or not self._refreshes(reply, req):
                    continue
                _reply, entry = self._learn(req, reply, old.qkey, old.variant, align=False)
                if entry is not None:
                    entry.hits, entry.last = old.hits, old.last  # popularity carries over
                    fresh.append(entry)
            now = self.clock.now
            for entry in fresh:
                self.store.align(entry, now)  # the TTLs follow on the next hit (stamp reset)
        finally:
            for _req, entry in work:
                entry.refreshing = False

    @staticmethod
    async def _ask(next: Handler, req: Request) -> Reply | None:
        try:
            return await next(req)
        except Exception as exc:
            log.debug("refreshing %s failed: %r", req.qname, exc)
            return None

    # -- observing -----------------------------------------------------------------------

    def _entry_counts(self) -> dict[Labels, float]:
        counts = (float(len(self.store.kinds[SUCCESS])), float(len(self.store.kinds[DENIAL])))
        return {
            (server, KIND_NAMES[kind], self.zones_label, VIEW): counts[kind]
            for server in self._servers
            for kind in (SUCCESS, DENIAL)
        }

    def cached(self, query: bytes, client_ip: str) -> bytes | None:
        """What the cache would answer ``client_ip`` for ``query`` without asking upstream
        (an expired entry counts while serve_stale may still serve it), with no counting.
        For tests and debugging; the hit path does not use it."""
        question = wire.parse_question(query)
        end = question.end
        qkey = query[12:end].lower()
        variant = (query[3] & _CD) >> 4 | question.do << 1 | question.edns << 2
        now = self.clock.now
        if client_ip.startswith("::ffff:") and "." in client_ip:
            client_ip = client_ip[7:]  # as Request.remote_ip shows it
        group = self.store.view(qkey[:-4], client_ip, now)
        entry = group.entries.get((variant, qkey)) if group is not None else None
        if entry is None or entry.qtype != question.qtype:
            return None
        if now >= entry.expires and (not self.stale or now >= entry.expires + self.stale):
            return None
        if entry.stamp != now:
            self._retime(entry, now)
        head = entry.heads[(query[2] & 1) | (query[3] & _AD) >> 4]
        return b"".join((query[:2], head, query[12:end], entry.tail))

    async def settle(self) -> None:
        """Wait for the background refreshes in flight (tests)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))


def _copy_request(req: Request, qtype: int | None = None) -> Request:
    """A request of our own for a background refresh (the client's is answered already),
    optionally for another type (an A entry's AAAA sibling)."""
    data, question = req.wire, req.question
    if qtype is not None:
        end = question.end
        data = data[: end - 4] + qtype.to_bytes(2, "big") + data[end - 2 :]
        question = question._replace(qtype=qtype)
    return Request(data, question, req.client, req.transport, req.server, req.zone)


def _clamp(ttl: int, least: int, most: int) -> int:
    """CoreDNS's computeTTL: at least MINTTL, at most TTL (the maximum wins a conflict)."""
    return min(max(ttl, least), most)


def _zone_set(zones: list[str]) -> frozenset[bytes]:
    """Zone names as lower-case wire names, to compare with the key's name bytes."""
    encoded = set()
    for zone in zones:
        labels = [] if zone == "." else zone.rstrip(".").split(".")
        encoded.add(b"".join(bytes((len(label),)) + label.encode("latin-1") for label in labels) + b"\x00")
    return frozenset(encoded)


def in_zones(name: bytes, zones: frozenset[bytes]) -> bool:
    """Whether the wire name (lower case) is one of ``zones`` or below one, label-wise."""
    offset = 0
    while True:
        if name[offset:] in zones:
            return True
        length = name[offset]
        if length == 0:
            return False
        offset += 1 + length


def _truncated(reply: Reply) -> bool:
    try:
        data = reply.wire
    except Exception:
        return False
    return len(data) >= wire.HEADER_SIZE and bool(data[2] & 0x02)
