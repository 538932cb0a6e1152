"""Records that it ran, then falls through; finds ``first`` through its block."""

from __future__ import annotations

from resolver.config import ServerBlock
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request


class Second(Plugin):
    name = "second"

    def __init__(self) -> None:
        self.partner: Plugin | None = None

    def connect(self, block: ServerBlock) -> None:
        self.partner = block.find("first")

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        req.metadata.setdefault("trace", []).append(self.name)
        if self.partner is not None:
            req.metadata["second_found"] = self.partner.name
        return await next(req)
