"""relay: a test-only forwarder, so loop can be tested before and apart from ``forward``.

Syntax::

    relay HOST:PORT | FILE

Sends each query's raw bytes over UDP to HOST:PORT, or to the first ``nameserver`` line
of FILE (a resolv.conf; ``nameserver HOST`` means port 53, tests write ``HOST:PORT``),
and returns the answer; SERVFAIL when none comes within 2 s or the port is closed. It
exposes ``targets`` and ``zone`` in the shape forward does, which is all the loop plugin
reads, and remembers the names it relayed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resolver import wire
from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.plugin import Handler, Plugin, expect_args
from resolver.reply import Reply
from resolver.request import Request

TIMEOUT = 2.0


@dataclass(frozen=True)
class Target:
    """Compatible with forward's targets."""

    host: str
    port: int
    transport: str = "dns"
    source: str = ""


class Relay(Plugin):
    name = "relay"

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.zone = "."
        self.relayed: list[str] = []

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Relay:
        (text,) = expect_args(directive, 1, 1)
        if "/" in text:
            return cls(_from_file(text, directive))
        host, _, port = text.rpartition(":")
        return cls([Target(host.strip("[]"), int(port), "dns", f"{directive.file}:{directive.line}: relay {text}")])

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        self.relayed.append(req.qname)
        target = self.targets[0]
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(answered), remote_addr=(target.host, target.port)
        )
        try:
            transport.sendto(req.wire)
            return Reply(wire=await asyncio.wait_for(answered, TIMEOUT), plugin=self.name)
        except (TimeoutError, OSError) as exc:
            return self.fail(req, wire.SERVFAIL, f"relay to {target.host}:{target.port}: {exc!r}")
        finally:
            transport.close()


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, answered: asyncio.Future[bytes]) -> None:
        self.answered = answered

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.answered.done():
            self.answered.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answered.done():
            self.answered.set_exception(exc)


def _from_file(path: str, directive: Directive) -> list[Target]:
    targets = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            host, _, port = fields[1].rpartition(":") if fields[1].count(":") == 1 else (fields[1], "", "53")
            targets.append(Target(host, int(port), "dns", f"{path} line {number}: {line.strip()}"))
    if not targets:
        raise directive.error(f"no nameserver in {path}")
    return targets
