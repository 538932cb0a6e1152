"""Answers with TXT records naming the plugins that ran before it, in order."""

from __future__ import annotations

from dnslib import QTYPE, RR, TXT

from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request


class Report(Plugin):
    name = "report"

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        reply = req.reply()
        trace = ",".join(req.metadata.get("trace", []))
        reply.add_answer(RR(req.qname, QTYPE.TXT, rdata=TXT(trace or "-")))
        if "second_found" in req.metadata:
            reply.add_answer(RR(req.qname, QTYPE.TXT, rdata=TXT("found:" + req.metadata["second_found"])))
        return self.answer(reply)
