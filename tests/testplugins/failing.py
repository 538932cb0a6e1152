"""Answers by the query name's first label, for the errors and log tests.

``boom.*``: SERVFAIL with an error; ``refused.*``: REFUSED with an error; ``nx.*``:
NXDOMAIN with an SOA; ``nodata.*``: NOERROR with an SOA and no answer; ``pod.*``: sets
``req.metadata["pod"]`` and falls through; anything else falls through.
"""

from __future__ import annotations

from dnslib import QTYPE, RR, SOA

from resolver import wire
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request


class Failing(Plugin):
    name = "failing"

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        first = req.qname.split(".", 1)[0]
        if first == "boom":
            return self.fail(req, wire.SERVFAIL, "boom: " + req.qname)
        if first == "refused":
            return self.fail(req, wire.REFUSED, "refused: " + req.qname)
        if first in ("nx", "nodata"):
            reply = req.reply(wire.NXDOMAIN if first == "nx" else wire.NOERROR, authoritative=True)
            reply.add_auth(RR("example.org.", QTYPE.SOA, ttl=60, rdata=SOA("ns.example.org.", "admin.example.org.")))
            return self.answer(reply)
        if first == "pod":
            req.metadata["pod"] = "default/client-7d9f"
        return await next(req)
