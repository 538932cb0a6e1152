"""``static``: answer every query from stored bytes, patching only ID and question.

This is the least a plugin can do per query, so a server running only ``static``
measures the core itself (parse, route, chain, deliver): the ceiling a cache hit can
reach before the cache's own work is added.
"""

from __future__ import annotations

from resolver import wire
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request

# NOERROR, QR|AA|RD, one question, one answer: "A 192.0.2.1" via a pointer to the question.
_ANSWER = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01"


class Static(Plugin):
    name = "static"

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        query = req.wire
        header = query[:2] + b"\x85\x00\x00\x01\x00\x01\x00\x00\x00\x00"
        return Reply(wire=header + query[wire.HEADER_SIZE : req.question.end] + _ANSWER, plugin="static")
