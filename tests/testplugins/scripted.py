"""``scripted``: an upstream whose every answer the test decides, counting what it was asked.

A test sets ``plugin.answer_with`` to a function of the ``Request`` returning a ``Reply``
(or None, or an awaitable of one, to hold the answer back), and reads ``plugin.asked``.
The default answers A and AAAA with one address (TTL 300) and other types with NODATA.

The module also has what the cache tests share: ``build`` for replies with chosen RCODE,
TTL, SOA, TC and client-specific flag; ``ManualClock``, a clock the test moves; and
``request``, a ``Request`` built from a raw query as the server builds it.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import dns.message
from dnslib import AAAA, QTYPE, RR, SOA, TXT, A

from resolver import wire
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import UDP, Request

Answer = Callable[[Request], "Reply | Awaitable[Reply | None] | None"]

SERVER = "dns://:53"


def build(
    req: Request,
    rcode: int = wire.NOERROR,
    ttl: int = 300,
    addresses: Sequence[str] | None = None,
    soa: tuple[int, int] | None = None,
    truncated: bool = False,
    client_specific: bool = False,
    txt: str | None = None,
) -> Reply:
    """A reply to ``req``: address records of its type (A/AAAA) when ``rcode`` is NOERROR
    and ``addresses`` is not empty, an SOA (TTL, MINIMUM) in authority, a TXT if asked."""
    message = req.reply(rcode=rcode, authoritative=True)
    if addresses is None:
        addresses = []
        if req.qclass == 1:  # an A record of class CH is another format: none outside IN
            addresses = ["192.0.2.1"] if req.qtype == QTYPE.A else ["2001:db8::1"] if req.qtype == QTYPE.AAAA else []
    for address in addresses:
        rdata = A(address) if ":" not in address else AAAA(address)
        message.add_answer(RR(req.name, QTYPE.A if ":" not in address else QTYPE.AAAA, req.qclass, ttl, rdata))
    if txt is not None:
        message.add_answer(RR(req.name, QTYPE.TXT, req.qclass, ttl, TXT(txt)))
    if soa is not None:
        soa_ttl, minimum = soa
        record = SOA("ns.example.", "hostmaster.example.", (1, 7200, 1800, 86400, minimum))
        message.add_auth(RR("example.", QTYPE.SOA, req.qclass, soa_ttl, record))
    if truncated:
        message.header.tc = 1
    return Reply(message, plugin="scripted", client_specific=client_specific)


def positive(req: Request) -> Reply:
    """A/AAAA: one address, TTL 300; other types: NODATA with an SOA."""
    if req.qtype in (QTYPE.A, QTYPE.AAAA):
        return build(req)
    return build(req, soa=(300, 60))


class Scripted(Plugin):
    name = "scripted"

    def __init__(self) -> None:
        self.answer_with: Answer = positive
        self.asked: Counter[tuple[str, int]] = Counter()
        self.clients: list[str] = []

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        self.asked[(req.qname, req.qtype)] += 1
        self.clients.append(req.remote_ip)
        result = self.answer_with(req)
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[return-value]

    def count(self, name: str, qtype: int | None = None) -> int:
        return sum(n for (qname, rtype), n in self.asked.items() if qname == name and qtype in (None, rtype))


class ManualClock:
    """A clock for the cache that moves only when the test says so."""

    def __init__(self, now: int = 1000) -> None:
        self.now = now

    def advance(self, seconds: int) -> None:
        self.now += seconds

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def query(name: str, rdtype: str = "A", qid: int = 0x1234, **options: Any) -> bytes:
    message = dns.message.make_query(name, rdtype, **options)
    message.id = qid
    return message.to_wire()


def request(data: bytes, client: str = "10.0.0.1", port: int = 40000, transport: str = UDP) -> Request:
    """A Request for a raw query, as the server builds it for a block serving ``.``."""
    return Request(data, wire.parse_question(data), (client, port), transport, SERVER, ".")
