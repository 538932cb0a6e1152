"""Raw DNS wire-format helpers for the per-query hot path.

Everything here works on ``bytes`` with ``struct`` and slicing: no dnslib objects. The
server parses every incoming query with these functions (header, question, EDNS OPT) so
that a plugin that can answer from stored bytes (the cache) never pays for a full parse.
dnslib is used on the slow path only (see ``Request.message``).

Layout reminders (RFC 1035 4.1): a 12-byte header ``ID FLAGS QDCOUNT ANCOUNT NSCOUNT
ARCOUNT``, then the question ``QNAME QTYPE QCLASS``, then resource records ``NAME TYPE
CLASS TTL RDLENGTH RDATA``. The EDNS OPT pseudo-record (RFC 6891) lives in the additional
section: its CLASS is the requester's UDP payload size and its TTL packs the extended
RCODE, the EDNS version and the DO flag.
"""

from __future__ import annotations

import functools
import re
import struct
from typing import NamedTuple

HEADER = struct.Struct("!HHHHHH")
HEADER_SIZE = 12
RR_FIXED = struct.Struct("!HHIH")  # TYPE CLASS TTL RDLENGTH after an owner name
U16 = struct.Struct("!H")

# Header flag bits (second 16-bit word).
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010

OPCODE_QUERY = 0
TYPE_OPT = 41
EDNS_DO = 0x8000

# Response codes used by the core.
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16  # extended RCODE: lower 4 bits in the header, upper 8 in the OPT TTL

# What this server advertises as its own UDP payload size in replies: the DNS Flag Day
# 2020 value, small enough to avoid IP fragmentation on any common path.
ADVERTISED_UDP_SIZE = 1232
MIN_UDP_SIZE = 512
MAX_NAME_LENGTH = 255
MAX_TCP_MESSAGE = 65535


class WireError(ValueError):
    """The packet is not well-formed DNS; the server answers FORMERR."""


class Question(NamedTuple):
    """What the server learns from one raw pass over a query."""

    end: int  # offset just past QTYPE/QCLASS
    qtype: int
    qclass: int
    edns: bool  # an OPT record was present
    udp_size: int  # the client's UDP payload size (512 without EDNS, never below 512)
    do: bool  # DNSSEC OK bit
    edns_version: int


def skip_name(wire: bytes, offset: int) -> int:
    """Return the offset just past the (possibly compressed) name at ``offset``."""
    size = len(wire)
    while True:
        if offset >= size:
            raise WireError("name runs past the end of the packet")
        length = wire[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:  # compression pointer ends the name
            if offset + 2 > size:
                raise WireError("truncated compression pointer")
            return offset + 2
        if length & 0xC0:
            raise WireError("unknown label type")
        offset += 1 + length


def question_name_end(wire: bytes) -> int:
    """Offset just past the question's QNAME, which must be uncompressed.

    A compression pointer in the first name of a message could only point back into the
    header, so it is malformed, not merely unusual.
    """
    offset = HEADER_SIZE
    size = len(wire)
    while True:
        if offset >= size:
            raise WireError("question name runs past the end of the packet")
        length = wire[offset]
        if length == 0:
            offset += 1
            break
        if length > 63:
            raise WireError("bad label in question name")
        offset += 1 + length
    if offset - HEADER_SIZE > MAX_NAME_LENGTH:
        raise WireError("question name longer than 255 octets")
    return offset


_QTYPE_QCLASS = struct.Struct("!HH")
_NO_EDNS = (False, MIN_UDP_SIZE, False, 0)
# Question(...) runs NamedTuple's generated __new__ (a Python call); tuple.__new__ with
# the fields in order builds the same object in half the time.
_question = functools.partial(tuple.__new__, Question)


def parse_question(wire: bytes) -> Question:
    """Parse the question and the EDNS OPT record of a query whose header was checked.

    Only what routing and replying need is decoded. The two shapes nearly every query
    has (nothing after the question; or one OPT record right after it) take a short path;
    anything else walks all records, which must then be well-formed.
    """
    # question_name_end, inlined: this runs for every query.
    offset = HEADER_SIZE
    size = len(wire)
    while True:
        if offset >= size:
            raise WireError("question name runs past the end of the packet")
        length = wire[offset]
        if not length:
            break
        if length > 63:
            raise WireError("bad label in question name")
        offset += 1 + length
    name_end = offset + 1
    if name_end - HEADER_SIZE > MAX_NAME_LENGTH:
        raise WireError("question name longer than 255 octets")
    end = name_end + 4
    if end > size:
        raise WireError("question truncated")
    qtype, qclass = _QTYPE_QCLASS.unpack_from(wire, name_end)
    counts = wire[6:12]
    if counts == b"\x00\x00\x00\x00\x00\x00":
        return _question((end, qtype, qclass, False, MIN_UDP_SIZE, False, 0))
    if counts == b"\x00\x00\x00\x00\x00\x01" and end + 11 <= size and wire[end] == 0:
        rtype, rclass, ttl, rdlength = RR_FIXED.unpack_from(wire, end + 1)
        if rtype == TYPE_OPT:
            if end + 11 + rdlength > size:
                raise WireError("OPT record data runs past the end of the packet")
            udp_size = rclass if rclass > MIN_UDP_SIZE else MIN_UDP_SIZE
            return _question((end, qtype, qclass, True, udp_size, bool(ttl & EDNS_DO), (ttl >> 16) & 0xFF))
    return Question(end, qtype, qclass, *_edns_from_records(wire, end))


def _edns_from_records(wire: bytes, offset: int) -> tuple[bool, int, bool, int]:
    """Walk every record after the question; return EDNS facts from the OPT record."""
    _id, _flags, _qd, ancount, nscount, arcount = HEADER.unpack_from(wire)
    edns, udp_size, do, version = _NO_EDNS
    for index in range(ancount + nscount + arcount):
        name_start = offset
        offset = skip_name(wire, offset)
        if offset + 10 > len(wire):
            raise WireError("resource record truncated")
        rtype, rclass, ttl, rdlength = RR_FIXED.unpack_from(wire, offset)
        offset += 10 + rdlength
        if offset > len(wire):
            raise WireError("resource data runs past the end of the packet")
        if rtype != TYPE_OPT:
            continue
        if index < ancount + nscount or edns or wire[name_start] != 0:
            raise WireError("misplaced or duplicate OPT record")
        edns = True
        udp_size = max(rclass, MIN_UDP_SIZE)
        version = (ttl >> 16) & 0xFF
        do = bool(ttl & EDNS_DO)
    return edns, udp_size, do, version


def name_labels(wire: bytes, start: int = HEADER_SIZE) -> tuple[bytes, ...]:
    """The labels of the uncompressed name at ``start``, exactly as sent (any bytes, any case)."""
    labels = []
    offset = start
    while length := wire[offset]:
        labels.append(wire[offset + 1 : offset + 1 + length])
        offset += 1 + length
    return tuple(labels)


_SPECIAL = re.compile(rb"[^\x21-\x7e]|[\\\"();@$]")  # escaped in presentation format (and ".")


def name_text(wire: bytes, start: int = HEADER_SIZE) -> str:
    """The uncompressed name at ``start`` as lower-case presentation text with a final dot.

    Lower-casing touches ASCII letters only, as DNS case-insensitivity does (RFC 4343).
    Special characters inside a label are escaped as in zone files and CoreDNS's logs
    (``\\.``, ``\\\\``, and ``\\DDD`` for bytes outside printable ASCII), so the
    text splits into the same labels again and a query name can never inject a newline
    or other control character into a log line.
    """
    labels = []
    offset = start
    while True:
        length = wire[offset]
        if length == 0:
            break
        labels.append(wire[offset + 1 : offset + 1 + length].lower())
        offset += 1 + length
    if not labels:
        return "."
    joined = b".".join(labels)
    # Common case, one regex pass: no dot inside any label and nothing else to escape.
    if joined.count(b".") == len(labels) - 1 and _SPECIAL.search(joined) is None:
        return joined.decode("ascii") + "."
    return ".".join(_escape_label(label) for label in labels) + "."


def _escape_label(label: bytes) -> str:
    out = []
    for byte in label:
        if 0x21 <= byte <= 0x7E:
            char = chr(byte)
            out.append("\\" + char if char in '.\\"();@$' else char)
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)


def opt_record(rcode: int = 0, do: bool = False) -> bytes:
    """An OPT pseudo-record advertising our UDP size; carries the upper bits of ``rcode``."""
    ttl = ((rcode >> 4) & 0xFF) << 24 | (EDNS_DO if do else 0)
    return b"\x00" + RR_FIXED.pack(TYPE_OPT, ADVERTISED_UDP_SIZE, ttl, 0)


def error_reply(query: bytes, rcode: int, question_end: int = 0, edns: bool = False, do: bool = False) -> bytes:
    """Build a reply carrying only ``rcode`` for ``query`` without parsing it further.

    ID, opcode, RD and CD are copied from the query, the question is echoed exactly as
    sent when ``question_end`` says where it ends, and an OPT record is added when the
    query had one (RFC 6891 6.1.1: a FORMERR caused by a bad OPT must not carry one, so
    the caller passes ``edns=False`` then).
    """
    flags = QR | (U16.unpack_from(query, 2)[0] & (OPCODE_MASK | RD | CD)) | (rcode & 0x0F)
    question = query[HEADER_SIZE:question_end] if question_end else b""
    opt = opt_record(rcode, do) if edns else b""
    header = HEADER.pack(U16.unpack_from(query)[0], flags, 1 if question else 0, 0, 0, 1 if opt else 0)
    return header + question + opt


def with_id(wire: bytes, query: bytes) -> bytes:
    """``wire`` with the message ID of ``query``."""
    if wire[:2] == query[:2]:
        return wire
    return query[:2] + wire[2:]


def rcode_of(wire: bytes) -> int:
    """The header RCODE of a message (extended bits in OPT are not included)."""
    return wire[3] & 0x0F


def truncate(wire: bytes, limit: int) -> bytes:
    """Cut a reply to at most ``limit`` octets at a resource record boundary.

    Records are kept in order (answer, authority, additional) while they fit; the OPT
    record is always kept so that the client still sees EDNS. Compression pointers only
    point backwards, so any prefix of the records stays valid. TC is set only when answer
    or authority records had to go (RFC 2181 9: missing glue alone is not truncation).
    """
    if len(wire) <= limit:
        return wire
    ident, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(wire)
    offset = HEADER_SIZE
    for _ in range(qdcount):
        offset = skip_name(wire, offset) + 4
    question_end = offset
    ends: list[int] = []  # end offset of each non-OPT record, in order
    opt = b""
    opt_start = len(wire)
    for _ in range(ancount + nscount + arcount):
        start = offset
        offset = skip_name(wire, offset)
        rtype, _cls, _ttl, rdlength = RR_FIXED.unpack_from(wire, offset)
        offset += 10 + rdlength
        if rtype == TYPE_OPT and not opt:
            opt, opt_start = wire[start:offset], start
            continue
        ends.append(offset)
    kept = 0
    cut = question_end
    for end in ends:
        # An OPT that sits before the cut is already inside the prefix.
        size = end if opt_start < end else end + len(opt)
        if size > limit:
            break
        kept += 1
        cut = end
    answers = min(kept, ancount)
    authority = min(max(kept - ancount, 0), nscount)
    additional = kept - answers - authority
    if opt_start < cut:
        tail = b""
        additional += 1  # the OPT record was counted out of ``ends`` but is in the prefix
    else:
        tail = opt if question_end + len(opt) <= limit else b""
        additional += 1 if tail else 0
    if answers < ancount or authority < nscount:
        flags |= TC
    header = HEADER.pack(ident, flags, qdcount, answers, authority, additional)
    return header + wire[HEADER_SIZE:cut] + tail
