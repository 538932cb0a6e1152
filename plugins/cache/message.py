"""One raw pass over an upstream reply: is it cacheable, for how long, and where its TTLs are.

This runs once per miss, never on a hit. It reads the reply the way ``resolver.wire``
reads queries (``struct`` over ``bytes``): the question must match the query, and every
resource record is walked once to learn its TTL field's offset (so a hit can rewrite TTLs
with ``pack_into`` and no parse), the smallest TTL, and the SOA of a negative answer.
"""

from __future__ import annotations

from resolver import wire
from resolver.wire import RR_FIXED, WireError, question_name_end, skip_name

TYPE_NS = 2
TYPE_SOA = 6
TYPE_A = 1
TYPE_AAAA = 28
TYPE_IXFR = 251
TYPE_AXFR = 252


class Analysis:
    """What the cache needs to know about one reply. A plain slots class: a dataclass
    with a list default costs a factory call per miss."""

    __slots__ = (
        "answers",
        "delegation",
        "max_ttl",
        "min_ttl",
        "opt_options",
        "question_end",
        "rcode",
        "soa_ttl",
        "truncated",
        "ttl_offsets",
    )

    def __init__(self, rcode: int, truncated: bool, answers: int, question_end: int) -> None:
        self.rcode = rcode  # full RCODE, the OPT record's extended bits included
        self.truncated = truncated
        self.answers = answers  # ANCOUNT
        self.question_end = question_end
        self.min_ttl: int | None = None  # smallest TTL of any record but OPT; None without records
        self.max_ttl: int | None = None  # largest, likewise (equal to min_ttl: one TTL throughout)
        self.soa_ttl: int | None = None  # min(SOA TTL, SOA MINIMUM) of the authority SOA (RFC 2308 5)
        self.delegation = False  # NS records in the authority section
        self.ttl_offsets: list[int] = []  # absolute offsets of TTL fields
        self.opt_options: tuple[int, int] | None = None  # (rdata start, end) when the OPT has options


def question_matches(reply: bytes, query: bytes, query_end: int) -> int:
    """The end of the reply's question if it is the query's (name case-insensitively,
    type and class exactly), else 0. The reply must be a response with one question."""
    if len(reply) < wire.HEADER_SIZE or not reply[2] & 0x80 or reply[4:6] != b"\x00\x01":
        return 0
    if reply[wire.HEADER_SIZE : query_end] == query[wire.HEADER_SIZE : query_end]:
        return query_end  # the query's own question bytes (forward hands them back): no walk
    try:
        name_end = question_name_end(reply)
    except WireError:
        return 0
    end = name_end + 4
    if end != query_end or end > len(reply):
        return 0
    if reply[name_end:end] != query[name_end:end]:
        return 0
    if reply[wire.HEADER_SIZE : name_end].lower() != query[wire.HEADER_SIZE : name_end].lower():
        return 0
    return end


def analyze(reply: bytes, question_end: int) -> Analysis:
    """Walk every record after the question; raises ``WireError`` on a malformed reply."""
    _id, flags, _qd, ancount, nscount, arcount = wire.HEADER.unpack_from(reply)
    result = Analysis(flags & 0x0F, bool(flags & wire.TC), ancount, question_end)
    offsets = result.ttl_offsets
    fixed = RR_FIXED.unpack_from
    offset = question_end
    size = len(reply)
    min_ttl: int | None = None
    max_ttl = 0
    authority_end = ancount + nscount
    for index in range(authority_end + arcount):
        # An owner name is almost always one compression pointer: two bytes, no walk.
        if offset < size and reply[offset] >= 0xC0:
            offset += 2
        else:
            offset = skip_name(reply, offset)
        if offset + 10 > size:
            raise WireError("resource record truncated")
        rtype, _rclass, ttl, rdlength = fixed(reply, offset)
        rdata = offset + 10
        end = rdata + rdlength
        if end > size:
            raise WireError("resource data runs past the end of the packet")
        if rtype == wire.TYPE_OPT:
            if index < authority_end:
                raise WireError("OPT record outside the additional section")
            result.rcode |= (ttl >> 24) << 4
            if rdlength:
                result.opt_options = (rdata, end)
        else:
            offsets.append(offset + 4)
            if min_ttl is None or ttl < min_ttl:
                min_ttl = ttl
            if ttl > max_ttl:
                max_ttl = ttl
            if index >= ancount and index < authority_end:
                if rtype == TYPE_SOA and result.soa_ttl is None:
                    result.soa_ttl = min(ttl, _soa_minimum(reply, rdata, end))
                elif rtype == TYPE_NS:
                    result.delegation = True
        offset = end
    if offset != size:
        raise WireError("trailing bytes after the last record")
    result.min_ttl = min_ttl
    result.max_ttl = max_ttl if min_ttl is not None else None
    return result


def _soa_minimum(reply: bytes, start: int, end: int) -> int:
    """The MINIMUM field of SOA rdata: the last of five 32-bit numbers after two names."""
    offset = skip_name(reply, skip_name(reply, start))
    if offset + 20 != end:
        raise WireError("malformed SOA record")
    return int.from_bytes(reply[end - 4 : end], "big")


def without_opt_options(reply: bytes, options: tuple[int, int]) -> bytes:
    """The reply with its OPT record's options removed (a cookie or an NSID is meant for
    the one client that asked, never for whoever hits the cache later)."""
    start, end = options
    return reply[: start - 2] + b"\x00\x00" + reply[end:]
