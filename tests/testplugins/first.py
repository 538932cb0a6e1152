"""Records that it ran, then falls through."""

from __future__ import annotations

from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request


class First(Plugin):
    name = "first"

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        req.metadata.setdefault("trace", []).append(self.name)
        return await next(req)
