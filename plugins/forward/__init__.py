"""forward: send queries to upstream resolvers over UDP, TCP or TLS, as CoreDNS's forward.

Syntax::

    forward FROM TO... [{
        except IGNORED_NAMES...
        force_tcp
        prefer_udp
        expire DURATION                         # 10s
        max_fails INTEGER                       # 2
        read_timeout DURATION                   # 2s
        max_connect_attempts INTEGER            # 2 per upstream
        tls [CERT KEY] [CA]
        tls_servername NAME
        policy random|round_robin|sequential    # random
        health_check DURATION [no_rec] [domain NAME]   # 0.5s
        max_concurrent MAX
        next RCODE...
        next_on_nodata
        failover RCODE...
        failfast_all_unhealthy_upstreams
    }]

FROM is the zone forwarded (names under an ``except`` zone are not); other queries go to
the next plugin. TO is ``IP``, ``IP:PORT``, ``[IPv6]:PORT``, ``dns://...``,
``tls://IP[:PORT]`` (port 853; ``tls://IP%NAME`` names the TLS server), or a resolv.conf
style file whose ``nameserver`` lines are used; at most 15 upstreams.

A query goes to the upstreams in the policy's order, skipping those that are down; an
upstream that fails is tried again no more than the connect-attempt budget allows, and
no query waits more than 5 s in all: then the client gets SERVFAIL (with the last error
for the errors plugin), never silence. The directive may be repeated in a block; the
forwards are tried in Corefile order, and ``next`` passes a reply with one of the given
RCODEs on to the following ``forward``.

Other plugins read ``targets`` (a list of ``Target``) and ``zone`` of an instance: loop
uses them to name what it probes.
"""

from __future__ import annotations

import asyncio
import random

from resolver import wire
from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.dnsnames import in_zone, in_zones
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request

from .options import Options, Target, parse
from .upstream import ForwardMetrics, Upstream, UpstreamError

__all__ = ["Forward", "Target"]

TOTAL_TIMEOUT = 5.0  # CoreDNS's defaultTimeout: no query waits longer for its upstreams
ATTEMPTS_PER_UPSTREAM = 2  # CoreDNS's default connect-attempt budget, per upstream
NO_HEALTHY = "no healthy proxies"


class Forward(Plugin):
    name = "forward"
    repeatable = True

    def __init__(self, options: Options, metrics: ForwardMetrics) -> None:
        self.options = options
        self.metrics = metrics
        #: The zone forwarded (FROM), lower case with a final dot: part of the public contract.
        self.zone = options.zone
        #: The upstreams as configured, in order: part of the public contract (loop reads it).
        self.targets: list[Target] = list(options.targets)
        self.upstreams = [
            Upstream(target, options, metrics, options.tls_context, options.server_names.get(index, ""))
            for index, target in enumerate(self.targets)
        ]
        self.ignored = options.ignored
        self.everything = options.zone == "." and not options.ignored
        self.max_attempts = (
            options.max_connect_attempts
            if options.max_connect_attempts is not None
            else ATTEMPTS_PER_UPSTREAM * len(self.upstreams)
        )
        self.limit_error = f"concurrent queries exceeded maximum {options.max_concurrent}"
        self.concurrent = 0
        self.robin = 0
        #: Is there a forward after this one in the block? (``next`` only hands over to one.)
        self.next_is_forward = False
        self.janitor: asyncio.Task[None] | None = None
        #: The loop this plugin serves on, kept from ``start``: ``asyncio.get_running_loop()``
        #: makes a ``getpid`` system call on Python 3.11, about a microsecond per call.
        self.loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Forward:
        options = parse(directive)
        return cls(options, ForwardMetrics.declare(block.runtime.metrics))

    def connect(self, block: ServerBlock) -> None:
        forwards = block.find_all(self.name)
        self.next_is_forward = forwards.index(self) < len(forwards) - 1

    async def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        for upstream in self.upstreams:
            upstream.use_loop(loop)
        self.janitor = loop.create_task(self._sweep())

    async def stop(self) -> None:
        if self.janitor is not None:
            self.janitor.cancel()
        for upstream in self.upstreams:
            upstream.stop()

    async def _sweep(self) -> None:
        """Close pooled connections idle past ``expire`` (CoreDNS's connection manager)
        and UDP sockets past their age."""
        interval = min(max(self.options.expire, 0.1), 10.0)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            for upstream in self.upstreams:
                upstream.sweep(loop.time())

    # -- serving -------------------------------------------------------------------------------

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        """CoreDNS's ServeDNS loop: try upstreams in policy order, skip the down ones,
        stop at the attempt budget or the 5 s deadline. One coroutine for all of it: a
        helper coroutine would cost its frame on every suspension and resumption."""
        if not self.everything and not self._matches(req.qname):
            return await next(req)
        options = self.options
        limit = options.max_concurrent
        if limit:
            if self.concurrent >= limit:
                self.metrics.rejects.inc()
                return self.fail(req, wire.REFUSED, self.limit_error)
            self.concurrent += 1
        try:
            loop = self.loop or asyncio.get_running_loop()
            deadline = loop.time() + TOTAL_TIMEOUT
            upstreams = self._order()
            count = len(upstreams)
            proto = "tcp" if options.force_tcp else "udp" if options.prefer_udp else req.transport
            error: UpstreamError | None = None
            index = down = attempts = failovers = 0
            while loop.time() < deadline and (not self.max_attempts or attempts < self.max_attempts):
                if index >= count:
                    index = down = 0  # round again, from the first
                upstream = upstreams[index]
                index += 1
                if upstream.down:
                    down += 1
                    if down < count:
                        continue
                    # Every upstream is down: assume the health checks are what is broken.
                    self.metrics.broken.inc()
                    if options.failfast:
                        break
                    upstream = random.choice(self.upstreams)
                req.metadata["forward/upstream"] = upstream.to
                try:
                    reply = await upstream.exchange(req, proto, deadline)
                except UpstreamError as exc:
                    error = exc
                    upstream.healthcheck()
                    attempts += 1
                    if down < count:
                        continue
                    break
                rcode = reply[3] & 0x0F
                if rcode in options.failover_rcodes:
                    failovers += 1
                    if failovers < count:
                        continue
                if self.next_is_forward and (
                    rcode in options.next_rcodes or (options.next_on_nodata and rcode == 0 and reply[6:8] == b"\0\0")
                ):
                    return await next(req)
                return self._reply(req, reply)
            return self.fail(req, wire.SERVFAIL, str(error) if error is not None else NO_HEALTHY)
        finally:
            if limit:
                self.concurrent -= 1

    def _matches(self, qname: str) -> bool:
        """Inside FROM, and not inside an ``except`` zone (FROM itself always is)."""
        if not in_zone(qname, self.zone):
            return False
        if qname == self.zone:
            return True
        return not in_zones(qname, self.ignored)

    def _order(self) -> list[Upstream]:
        """The upstreams in the order this query tries them (CoreDNS's policies)."""
        upstreams = self.upstreams
        count = len(upstreams)
        policy = self.options.policy
        if count == 1 or policy == "sequential":
            return upstreams
        if policy == "round_robin":
            self.robin += 1
            first = self.robin % count
            return [upstreams[first], *upstreams[:first], *upstreams[first + 1 :]]
        if count == 2:
            return upstreams if random.getrandbits(1) else [upstreams[1], upstreams[0]]
        return random.sample(upstreams, count)

    def _reply(self, req: Request, reply: bytes) -> Reply:
        """The upstream's reply under the client's ID and with the client's question bytes
        (the same name up to case, so every later offset stays valid)."""
        query = req.wire
        end = req.question.end
        if reply[4:6] == b"\x00\x00":  # an error reply without a question: give the client its rcode
            return Reply(
                wire=wire.error_reply(query, reply[3] & 0x0F, end, req.edns, req.do),
                plugin=self.name,
                error=f"upstream answered {reply[3] & 0x0F} without a question",
            )
        if reply[12:end] == query[12:end]:  # the usual case: the upstream kept the name's case
            return Reply(wire=query[:2] + reply[2:], plugin=self.name)
        return Reply(wire=query[:2] + reply[2:12] + query[12:end] + reply[end:], plugin=self.name)
