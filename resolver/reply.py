"""The reply a plugin hands back up the chain.

A reply is either a dnslib message (built on the slow path) or finished wire bytes (the
cache's stored answer with the client's ID patched in). Both forms are available on
demand and each is produced at most once, so observers up the chain (metrics, logging,
the cache storing a fresh answer) can look at whichever form is cheap for them.

A plugin that wants the server to send nothing at all (acl's ``drop``) returns ``None``
instead of a ``Reply``.
"""

from __future__ import annotations

from dnslib import DNSRecord

from resolver import wire


class Reply:
    """A response on its way back to the client, with who wrote it and why."""

    __slots__ = ("_message", "_wire", "cacheable", "client_specific", "error", "plugin")

    def __init__(
        self,
        message: DNSRecord | None = None,
        *,
        wire: bytes | None = None,
        plugin: str = "",
        error: str | None = None,
        client_specific: bool = False,
        cacheable: bool = True,
    ) -> None:
        if message is None and wire is None:
            raise ValueError("a Reply needs a message or wire bytes")
        self._message = message
        self._wire = wire
        self.plugin = plugin  # the ``plugin`` label of coredns_dns_responses_total
        self.error = error  # what went wrong, for the errors plugin; None on success
        #: The answer depends on who asked (autopath expanded the name with the client's
        #: search path): a cache may reuse it only for the same client address.
        self.client_specific = client_specific
        #: False for answers no cache may keep at all (whoami: they depend on the client's
        #: port too, which changes with every query).
        self.cacheable = cacheable

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            assert self._message is not None
            self._wire = bytes(self._message.pack())
        return self._wire

    @property
    def message(self) -> DNSRecord:
        if self._message is None:
            assert self._wire is not None
            self._message = DNSRecord.parse(self._wire)
        return self._message

    def rewired(self, data: bytes) -> Reply:
        """This reply with other wire bytes (the same plugin, error and flags): itself,
        changed, when it holds only bytes (one object less per cache miss), else a new
        reply, so that a parsed message never disagrees with the bytes."""
        if self._message is None:
            self._wire = data
            return self
        return Reply(
            wire=data,
            plugin=self.plugin,
            error=self.error,
            client_specific=self.client_specific,
            cacheable=self.cacheable,
        )

    @property
    def packed(self) -> bytes | None:
        """The wire bytes if this reply already has them (never packs), else None."""
        return self._wire

    @property
    def parsed(self) -> DNSRecord | None:
        """The dnslib message if this reply already has it (never parses), else None."""
        return self._message

    @property
    def rcode(self) -> int:
        """The full RCODE, extended bits from OPT included when known cheaply."""
        if self._message is not None:
            return self._message.header.rcode | (_ext_rcode(self._message) << 4)
        return wire.rcode_of(self.wire)

    def __repr__(self) -> str:
        return f"<Reply rcode={self.rcode} plugin={self.plugin!r} error={self.error!r}>"


def _ext_rcode(message: DNSRecord) -> int:
    for record in message.ar:
        if record.rtype == wire.TYPE_OPT:
            return (record.ttl >> 24) & 0xFF
    return 0
