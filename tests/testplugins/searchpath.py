"""searchpath: a stand-in for the kubernetes plugin as autopath sees it, with an answer table.

Syntax::

    searchpath [ZONES...]

ZONES (default ``cluster.local``) play the kubernetes zones. The test fills, after start:

* ``pods``: client IP -> namespace. ``autopath_search(req)`` gives such a client the
  kubernetes search path ``<ns>.svc.<zone>``, ``svc.<zone>``, ``<zone>``, then ``host``
  (the "host resolv.conf" domains), then ``""``; None for other clients and for names
  outside ZONES, as the fixed interface in the brief says.
* ``load(zone_text)``: records in zone-file lines. A query gets the records of its name and
  type (following one CNAME inside the table), NODATA with an SOA when the name has only
  other types, NXDOMAIN with an SOA otherwise; ``failing`` names get SERVFAIL with an error.

``settings`` has ``zones`` and ``watch_pods``, the two fields of the kubernetes Settings
autopath reads and writes. ``asked`` lists (name, type, client) in order.
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


@dataclass
class Table:
    records: dict[str, list[RR]] = field(default_factory=dict)

    def add(self, record: RR) -> None:
        self.records.setdefault(str(record.rname).lower(), []).append(record)


class SearchPath(Plugin):
    name = "searchpath"

    def __init__(self, zones: list[str]) -> None:
        self.settings = Settings(zones)
        self.pods: dict[str, str] = {}
        self.host: list[str] = []
        self.table = Table()
        self.failing: set[str] = set()
        self.asked: list[tuple[str, str, str]] = []

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> SearchPath:
        return cls(zone_arguments(directive.args, directive) or ["cluster.local."])

    def load(self, text: str) -> None:
        for record in RR.fromZone(text):
            self.table.add(record)

    def autopath_search(self, req: Request) -> list[str] | None:
        zones = [zone for zone in self.settings.zones if in_zones(req.qname, [zone])]
        namespace = self.pods.get(req.remote_ip)
        if not zones or namespace is None:
            return None
        zone = max(zones, key=len)
        return [f"{namespace}.svc.{zone}", f"svc.{zone}", zone, *self.host, ""]

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        name = req.qname
        self.asked.append((name, QTYPE.get(req.qtype), req.remote_ip))
        if name in self.failing:
            return self.fail(req, wire.SERVFAIL, f"searchpath: {name} is failing")
        records = self.table.records.get(name)
        if records is None:
            return self._negative(req, wire.NXDOMAIN)
        answer = [record for record in records if record.rtype in (req.qtype, QTYPE.CNAME)]
        for record in list(answer):
            if record.rtype == QTYPE.CNAME and req.qtype != QTYPE.CNAME:
                target = self.table.records.get(str(record.rdata.label).lower(), [])
                answer.extend(found for found in target if found.rtype == req.qtype)
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
