"""whoami: answer every query with the client's address, port and transport.

Syntax::

    whoami

The reply is authoritative, has an empty answer section, and carries in the additional
section an A (IPv4 client) or AAAA (IPv6 client) record for the query name holding the
client's address, and an SRV record ``_udp.<qname>`` (or ``_tcp.``) whose port is the
client's source port. TTLs are 0. This is CoreDNS's whoami, byte for byte in meaning.
"""

from __future__ import annotations

from dnslib import AAAA, QTYPE, RR, SRV, A, DNSLabel

from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request


class Whoami(Plugin):
    name = "whoami"

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        reply = req.reply(authoritative=True)
        name = req.name
        if req.family == 1:
            address = RR(name, QTYPE.A, req.qclass, 0, A(req.remote_ip))
        else:
            address = RR(name, QTYPE.AAAA, req.qclass, 0, AAAA(req.remote_ip))
        service_name = DNSLabel((f"_{req.transport}".encode(), *name.label))
        service = RR(service_name, QTYPE.SRV, req.qclass, 0, SRV(0, 0, req.remote_port, "."))
        # Keep the OPT record (if any) last, where resolvers expect it.
        reply.ar[0:0] = [address, service]
        # It describes this one query (address and port): nothing a cache may keep.
        return Reply(reply, plugin=self.name, cacheable=False)
