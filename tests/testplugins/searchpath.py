"""searchpath: a stand-in for the kubernetes plugin as autopath sees it, with an answer table.

Syntax::

    searchpath [ZONES...] [{
        opaque        # settings show no zones (a provider autopath knows nothing about)
        ttl SECONDS   # settings.ttl (default 5, as kubernetes)
    }]

ZONES (default ``cluster.local``) play the kubernetes zones. The test fills, after start:

* ``pods``: client IP -> namespace. ``autopath_search(req)`` gives such a client the
  kubernetes search path ``<ns>.svc.<zone>``, ``svc.<zone>``, ``<zone>``, then ``host``
  (the "host resolv.conf" domains), then ``""``; None for other clients and for names
  outside ZONES, as the fixed interface in the brief says (like kubernetes, whatever the
  query's class: the class is autopath's business).
* ``load(zone_text)``: records in zone-file lines. A query gets the records of its name,
  type and class (following one CNAME inside the table), NODATA with an SOA when the name
  has only other types, NXDOMAIN with an SOA otherwise (a class with no records has no
  names); ``failing`` names get SERVFAIL with an error, ``dropping`` names no reply at all
  (``acl drop``), ``garbage`` names a NOERROR reply whose body cannot be parsed.

``settings`` has ``zones``, ``watch_pods`` and ``ttl``, the fields of the kubernetes
Settings autopath reads and writes. ``asked`` lists (name, type, client) in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dnslib import QTYPE, RR, SOA

from resolver import wire
from resolver.config import ServerBlock, zone_arguments
from resolver.corefile import Directive
from resolver.dnsnames import in_zones
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request

NEGATIVE_TTL = 30


@dataclass
class Settings:
    zones: list[str]
    watch_pods: bool = False
    ttl: int = 5


@dataclass
class Table:
    records: dict[str, list[RR]] = field(default_factory=dict)

    def add(self, record: RR) -> None:
        self.records.setdefault(str(record.rname).lower(), []).append(record)


class SearchPath(Plugin):
    name = "searchpath"

    def __init__(self, zones: list[str], opaque: bool = False, ttl: int = 5) -> None:
        self.zones = zones
        self.settings = Settings([] if opaque else zones, ttl=ttl)
        self.pods: dict[str, str] = {}
        self.host: list[str] = []
        self.table = Table()
        self.failing: set[str] = set()
        self.dropping: set[str] = set()
        self.garbage: set[str] = set()
        self.asked: list[tuple[str, str, str]] = []

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> SearchPath:
        opaque, ttl = False, 5
        for option in directive.block or ():
            if option.name == "opaque" and not option.args:
                opaque = True
            elif option.name == "ttl" and len(option.args) == 1 and option.args[0].isdigit():
                ttl = int(option.args[0])
            else:
                raise option.error(f'unknown option "{option.name}"')
        return cls(zone_arguments(directive.args, directive) or ["cluster.local."], opaque, ttl)

    def load(self, text: str) -> None:
        for record in RR.fromZone(text):
            self.table.add(record)

    def autopath_search(self, req: Request) -> list[str] | None:
        zones = [zone for zone in self.zones if in_zones(req.qname, [zone])]
        namespace = self.pods.get(req.remote_ip)
        if not zones or namespace is None:
            return None
        zone = max(zones, key=len)
        suffix = "" if zone == "." else zone
        return [f"{namespace}.svc.{suffix}", f"svc.{suffix}", zone, *self.host, ""]

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        name = req.qname
        self.asked.append((name, QTYPE.get(req.qtype), req.remote_ip))
        if name in self.failing:
            return self.fail(req, wire.SERVFAIL, f"searchpath: {name} is failing")
        if name in self.dropping:
            return None
        if name in self.garbage:
            # A NOERROR header that promises an answer record the body does not hold.
            data = req.wire[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + req.question_bytes
            return Reply(wire=data + b"\xc0", plugin=self.name)
        records = [record for record in self.table.records.get(name, ()) if record.rclass == req.qclass]
        if not records:
            return self._negative(req, wire.NXDOMAIN)
        answer = [record for record in records if record.rtype in (req.qtype, QTYPE.CNAME)]
        for record in list(answer):
            if record.rtype == QTYPE.CNAME and req.qtype != QTYPE.CNAME:
                target = self.table.records.get(str(record.rdata.label).lower(), [])
                answer.extend(found for found in target if found.rtype == req.qtype and found.rclass == req.qclass)
        if not answer:
            return self._negative(req, wire.NOERROR)
        message = req.reply(authoritative=True)
        for record in answer:
            message.add_answer(record)
        return Reply(message, plugin=self.name)

    def _negative(self, req: Request, rcode: int) -> Reply:
        message = req.reply(rcode=rcode, authoritative=True)
        soa = SOA("ns.dns.example.", "hostmaster.example.", (1, 7200, 1800, 86400, NEGATIVE_TTL))
        message.add_auth(RR("example.", QTYPE.SOA, 1, NEGATIVE_TTL, soa))
        return Reply(message, plugin=self.name)
