"""Answers TXT "ok" after 300ms, or SERVFAIL if it was stopped meanwhile; records stop()."""

from __future__ import annotations

import asyncio

from dnslib import QTYPE, RR, TXT

from resolver import wire
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request


class SlowStop(Plugin):
    name = "slowstop"

    def __init__(self) -> None:
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        await asyncio.sleep(0.3)
        if self.stopped:
            return self.fail(req, wire.SERVFAIL, "stopped while the query was in flight")
        reply = req.reply()
        reply.add_answer(RR(req.qname, QTYPE.TXT, rdata=TXT("ok")))
        return self.answer(reply)
