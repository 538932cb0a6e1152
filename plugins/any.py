"""any: give ANY queries the short RFC 8482 answer instead of every record.

Syntax::

    any

A query of type ANY gets one HINFO record for the query name (as the client wrote it),
CPU ``"ANY obsoleted"``, OS ``"See RFC 8482"``, TTL 8482, class IN, with no AA bit, as
CoreDNS's ``plugin/any`` answers. Every other query goes to the next plugin untouched,
so the plugin costs one integer comparison per query.
"""

from __future__ import annotations

from dnslib import QTYPE, RD, RR

from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request

TYPE_ANY = 255
HINFO_TTL = 8482
CLASS_IN = 1


def _character_strings(*texts: bytes) -> bytes:
    """RDATA made of <character-string>s (RFC 1035 3.3): a length byte, then the bytes."""
    return b"".join(bytes([len(text)]) + text for text in texts)


# dnslib has no HINFO class; its generic RD packs these bytes as they are.
HINFO_RDATA = _character_strings(b"ANY obsoleted", b"See RFC 8482")


class Any(Plugin):
    name = "any"

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        if req.qtype != TYPE_ANY:
            return await next(req)
        reply = req.reply()
        reply.add_answer(RR(reply.q.qname, QTYPE.HINFO, CLASS_IN, HINFO_TTL, RD(HINFO_RDATA)))
        return self.answer(reply)
