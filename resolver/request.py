"""The request a plugin sees: the raw query plus what the server learnt about it.

A ``Request`` is built for every query, so it is cheap: the raw bytes, the client
address, and the handful of fields one raw pass gives (``wire.parse_question``). Anything
dearer (the query name as text, the dnslib message) is computed on first use, so a plugin
that answers from bytes (the cache) never pays for it.
"""

from __future__ import annotations

import socket
from typing import Any

from dnslib import EDNS0, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from resolver import wire
from resolver.wire import Question

UDP = "udp"
TCP = "tcp"


class Request:
    """One query in flight through a server block's plugin chain."""

    __slots__ = (
        "_message",
        "_qname",
        "client",
        "declined_by",
        "metadata",
        "question",
        "server",
        "transport",
        "wire",
        "zone",
    )

    def __init__(
        self,
        query: bytes,
        question: Question,
        client: tuple[Any, ...],
        transport: str,
        server: str = "",
        zone: str = ".",
        qname: str | None = None,
    ) -> None:
        self.wire = query
        self.question = question
        self.client = client
        self.transport = transport
        self.server = server  # e.g. "dns://:53", the label CoreDNS's metrics use
        self.zone = zone  # the server block zone that matched the query name
        self.metadata: dict[str, Any] = {}
        self._qname = qname
        self._message: DNSRecord | None = None
        #: The plugin whose ``serve_at_once`` already said no for this query (the server's
        #: fast path tried it first): its ``serve`` may skip asking itself again.
        self.declined_by: object = None

    # -- cheap facts from the raw pass -------------------------------------------------

    @property
    def id(self) -> int:
        return (self.wire[0] << 8) | self.wire[1]

    @property
    def qtype(self) -> int:
        return self.question.qtype

    @property
    def qclass(self) -> int:
        return self.question.qclass

    @property
    def do(self) -> bool:
        return self.question.do

    @property
    def edns(self) -> bool:
        return self.question.edns

    @property
    def udp_size(self) -> int:
        return self.question.udp_size

    @property
    def question_bytes(self) -> bytes:
        """The question section exactly as the client sent it (case preserved)."""
        return self.wire[wire.HEADER_SIZE : self.question.end]

    @property
    def labels(self) -> tuple[bytes, ...]:
        """The query name's labels exactly as sent (letter case and any bytes kept)."""
        return wire.name_labels(self.wire)

    @property
    def name(self) -> DNSLabel:
        """The query name, lower case, for owner names of records a plugin builds.

        Built from the wire labels, not from ``qname``: a label may hold a dot or bytes
        that are not text, and the escaped text form would not survive a round trip.
        """
        return DNSLabel(tuple(label.lower() for label in self.labels))

    @property
    def qname(self) -> str:
        """The query name, lower case, with a final dot (dots inside labels escaped)."""
        if self._qname is None:
            self._qname = wire.name_text(self.wire)
        return self._qname

    @property
    def remote_ip(self) -> str:
        """The client's IP, with IPv4-mapped IPv6 addresses shown as plain IPv4."""
        ip = self.client[0]
        return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip

    @property
    def remote_port(self) -> int:
        return int(self.client[1])

    @property
    def family(self) -> int:
        """1 for IPv4, 2 for IPv6: the ``family`` label of CoreDNS's metrics."""
        return 1 if ":" not in self.remote_ip else 2

    @property
    def address_family(self) -> socket.AddressFamily:
        return socket.AF_INET if self.family == 1 else socket.AF_INET6

    # -- the slow path -------------------------------------------------------------------

    @property
    def message(self) -> DNSRecord:
        """The query parsed by dnslib; raises ``dnslib.DNSError`` on malformed input."""
        if self._message is None:
            self._message = DNSRecord.parse(self.wire)
        return self._message

    def reply(self, rcode: int = wire.NOERROR, authoritative: bool = False) -> DNSRecord:
        """An empty response to this query, ready for a plugin to fill in.

        Built from the raw query, without parsing it with dnslib: ID, opcode, RD and CD
        come from the header and the question is the client's own labels (letter case
        too, so 0x20-randomising clients accept it; any bytes too). EDNS is reflected
        when the query used it, with the DO bit mirrored.
        """
        query = self.wire
        header = DNSHeader(
            id=(query[0] << 8) | query[1],
            qr=1,
            opcode=(query[2] >> 3) & 0x0F,
            aa=int(authoritative),
            rd=query[2] & 0x01,
            rcode=rcode & 0x0F,
        )
        header.cd = (query[3] >> 4) & 0x01
        question = DNSQuestion(DNSLabel(self.labels), self.question.qtype, self.question.qclass)
        response = DNSRecord(header, questions=[question])
        if self.edns:
            response.add_ar(
                EDNS0(udp_len=wire.ADVERTISED_UDP_SIZE, flags="do" if self.do else "", ext_rcode=rcode >> 4)
            )
        return response

    def __repr__(self) -> str:
        return f"<Request {self.qname} type={self.qtype} from {self.remote_ip}:{self.remote_port}/{self.transport}>"
