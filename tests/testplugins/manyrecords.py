"""``manyrecords [wire]``: answers with many records, for loadbalance's tests.

The first label of the query name picks the reply (``ZONE`` is the rest of the name):

* ``chain.ZONE``: ``chain.ZONE CNAME target.chain.ZONE``, then eight A records
  ``10.0.0.1``..``10.0.0.8`` for the target; four AAAA records for the target in the
  additional section. Packed by dnslib, the A/AAAA owners point into the CNAME's data.
* ``mixed.ZONE``: the answer ``A 10.0.0.1, TXT, A 10.0.0.2, CNAME, A 10.0.0.3, MX 10,
  MX 20`` in that order.
* ``mx.ZONE``: six MX records ``mxN.mx.ZONE`` with an A glue record for each in the
  additional section (the glue owners point into the MX data).
* ``nx.ZONE``: NXDOMAIN carrying eight A records (which must not be shuffled).
* anything else: eight A records for the query name.

With ``wire`` the reply is handed back as packed bytes only, as a cache hit would be.
"""

from __future__ import annotations

from dnslib import AAAA, CNAME, MX, QTYPE, RR, TXT, A

from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.plugin import Handler, Plugin, expect_args
from resolver.reply import Reply
from resolver.request import Request

ADDRESSES = [f"10.0.0.{n}" for n in range(1, 9)]


class ManyRecords(Plugin):
    name = "manyrecords"

    def __init__(self, packed: bool) -> None:
        self.packed = packed

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> ManyRecords:
        args = expect_args(directive, 0, 1)
        if args and args[0] != "wire":
            raise directive.error(f'unknown argument "{args[0]}"')
        return cls(bool(args))

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        qname = req.qname
        kind = qname.split(".", 1)[0]
        reply = req.reply(authoritative=True)
        if kind == "chain":
            target = "target." + qname
            reply.add_answer(RR(qname, QTYPE.CNAME, ttl=60, rdata=CNAME(target)))
            for address in ADDRESSES:
                reply.add_answer(RR(target, QTYPE.A, ttl=60, rdata=A(address)))
            extra = [RR(target, QTYPE.AAAA, ttl=60, rdata=AAAA(f"2001:db8::{n}")) for n in range(1, 5)]
            reply.ar[0:0] = extra  # before the OPT record, if any
        elif kind == "mixed":
            reply.add_answer(
                RR(qname, QTYPE.A, ttl=60, rdata=A("10.0.0.1")),
                RR(qname, QTYPE.TXT, ttl=60, rdata=TXT("text")),
                RR(qname, QTYPE.A, ttl=60, rdata=A("10.0.0.2")),
                RR(qname, QTYPE.CNAME, ttl=60, rdata=CNAME("other." + qname)),
                RR(qname, QTYPE.A, ttl=60, rdata=A("10.0.0.3")),
                RR(qname, QTYPE.MX, ttl=60, rdata=MX("mx10." + qname, 10)),
                RR(qname, QTYPE.MX, ttl=60, rdata=MX("mx20." + qname, 20)),
            )
        elif kind == "mx":
            glue = []
            for n in range(1, 7):
                host = f"mx{n}.{qname}"
                reply.add_answer(RR(qname, QTYPE.MX, ttl=60, rdata=MX(host, 10 * n)))
                glue.append(RR(host, QTYPE.A, ttl=60, rdata=A(f"10.0.1.{n}")))
            reply.ar[0:0] = glue
        else:
            if kind == "nx":
                reply.header.rcode = 3
            for address in ADDRESSES:
                reply.add_answer(RR(qname, QTYPE.A, ttl=60, rdata=A(address)))
        if self.packed:
            return Reply(wire=bytes(reply.pack()), plugin=self.name)
        return self.answer(reply)
