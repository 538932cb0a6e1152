"""Reports readiness for the ready plugin: not ready until told.

Syntax::

    notready [silent]

``ready()`` returns ``is_ready`` (False at first) and counts the calls in ``asked``; a
query for a name starting with ``become-ready.`` sets ``is_ready`` and is answered with
an empty NOERROR, other queries fall through. ``silent`` makes ``ready()`` return None
(a plugin that does not report). Tests may also set ``is_ready`` directly.
"""

from __future__ import annotations

from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.plugin import Handler, Plugin, expect_args
from resolver.reply import Reply
from resolver.request import Request

TRIGGER = "become-ready."


class NotReady(Plugin):
    name = "notready"

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.is_ready = False
        self.asked = 0

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> NotReady:
        args = expect_args(directive, 0, 1)
        if args and args[0] != "silent":
            raise directive.error(f'unknown argument "{args[0]}"')
        return cls(silent=bool(args))

    def ready(self) -> bool | None:
        self.asked += 1
        return None if self.silent else self.is_ready

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        if req.qname.startswith(TRIGGER):
            self.is_ready = True
            return self.answer(req.reply(authoritative=True))
        return await next(req)
