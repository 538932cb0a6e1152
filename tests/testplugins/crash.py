"""Raises on names starting with ``crash``; ``crash-late`` raises after waiting."""

from __future__ import annotations

import asyncio

from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request


class Crash(Plugin):
    name = "crash"

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        if req.qname.startswith("crash-late."):
            await asyncio.sleep(0.01)
            raise RuntimeError("deliberate failure after a wait")
        if req.qname.startswith("crash."):
            raise RuntimeError("deliberate failure")
        return await next(req)
