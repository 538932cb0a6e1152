"""loadbalance: shuffle the A, AAAA and MX records of every reply (round-robin DNS).

Syntax::

    loadbalance [round_robin] [{
        prefer CIDR...            # addresses in these networks first, in the order given
    }]

``round_robin`` is the default and the only policy; CoreDNS's ``weighted WEIGHTFILE`` is
rejected with a one-line error.

As in CoreDNS, each section of a NOERROR reply (answer, authority, additional) is put in
the order CNAME records, other records, A/AAAA records (shuffled together), MX records
(shuffled); a section of addresses only is simply shuffled. CNAMEs go first because some
stub resolvers (glibc) insist on it. Zone transfers (AXFR, IXFR) and replies with any
other RCODE are left alone. With ``prefer``, after the shuffle the A/AAAA records of the
answer and additional sections that fall into the first network come first, then those
in the second, and so on (CoreDNS then puts the section in the order CNAME, addresses,
MX, others).

Differences from CoreDNS: the OPT (and TSIG) record keeps its place at the end of the
additional section, where CoreDNS moves it in front of the addresses; and a reply that
arrives as packed bytes (a cache hit) is shuffled too, where CoreDNS's ``Write`` path
logs a warning and sends it unshuffled.

Cost: a reply that is a dnslib message is reordered list-wise (a few microseconds, no
parse). A reply that is wire bytes is reordered on the wire by slicing whole records,
about 1 us per record, when that is safe (see ``reorder_wire``); otherwise it is parsed
with dnslib and packed again, tens of microseconds.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence
from random import shuffle

from dnslib import DNSRecord

from resolver import wire
from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.plugin import Handler, Plugin, raise_unknown_option
from resolver.reply import Reply
from resolver.request import Request

POLICY = "round_robin"

TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_MX = 15
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_DNAME = 39
TYPE_DS = 43
TYPE_RRSIG = 46
TYPE_NSEC = 47
TYPE_DNSKEY = 48
TYPE_NSEC3 = 50
TYPE_TSIG = 250
TYPE_IXFR = 251
TYPE_AXFR = 252

_ADDRESS_TYPES = (TYPE_A, TYPE_AAAA)
_XFR = (TYPE_IXFR, TYPE_AXFR)
# Records that must stay at the end of the additional section.
_LAST = (wire.TYPE_OPT, TYPE_TSIG)

# Record types whose RDATA holds no domain name, hence no compression pointer.
_NO_NAMES = frozenset({TYPE_A, TYPE_AAAA, TYPE_TXT, wire.TYPE_OPT, TYPE_DS, TYPE_DNSKEY, TYPE_NSEC3})
# Record types whose RDATA holds names at a known place: (octets before them, how many).
# A pointer may hide in any of them (compressed or not by the RFCs, senders differ).
_RDATA_NAMES: dict[int, tuple[int, int]] = {
    TYPE_NS: (0, 1),
    TYPE_CNAME: (0, 1),
    TYPE_PTR: (0, 1),
    TYPE_DNAME: (0, 1),
    TYPE_NSEC: (0, 1),
    TYPE_SOA: (0, 2),
    TYPE_MX: (2, 1),
    TYPE_SRV: (6, 1),
    TYPE_RRSIG: (18, 1),
}

#: A preferred network: (address length in octets, network as an integer, netmask).
Network = tuple[int, int, int]


class LoadBalance(Plugin):
    name = "loadbalance"

    def __init__(self, prefer: Sequence[Network] = ()) -> None:
        self.prefer = tuple(prefer)

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> LoadBalance:
        args = directive.args
        if args:
            policy = args[0]
            if policy == "weighted":
                raise directive.error('policy "weighted" is not supported (only round_robin)')
            if policy != POLICY:
                raise directive.error(f'unknown policy "{policy}" (only round_robin is supported)')
            if len(args) > 1:
                raise directive.error(f"round_robin takes no more arguments, got {' '.join(args[1:])!r}")
        prefer: list[Network] = []
        for option in directive.children:
            if option.name != "prefer":
                raise raise_unknown_option(directive, option)
            if option.block:
                raise directive.error("prefer takes no block", line=option.line)
            prefer.extend(_network(text, directive, option.line) for text in option.args)
        return cls(prefer)

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        reply = await next(req)
        if reply is None or req.qtype in _XFR:
            return reply
        return self.shuffle(reply)

    def shuffle(self, reply: Reply) -> Reply:
        """``reply`` with its records reordered, or ``reply`` itself when nothing moves."""
        # Use whichever form the reply already has: the packed bytes need no pack, the
        # message no parse.
        packed = reply.packed
        if packed is not None:
            if packed[3] & 0x0F:  # RCODE: only NOERROR replies are shuffled
                return reply
            if packed[6:12] in _AT_MOST_ONE_PER_SECTION:
                return reply
            try:
                moved = reorder_wire(packed, self.prefer)
            except (wire.WireError, struct.error, IndexError):
                moved = None  # dnslib below says what is wrong with it, or copes
            if moved is packed:
                return reply
            if moved is not None:
                return Reply(wire=moved, plugin=reply.plugin, error=reply.error)
        if reply.rcode != wire.NOERROR:
            return reply
        message = reorder_message(reply.message, self.prefer)
        if message is None:
            return reply
        return Reply(message, plugin=reply.plugin, error=reply.error)


# ANCOUNT NSCOUNT ARCOUNT where no section has two records: no order can change.
_AT_MOST_ONE_PER_SECTION = frozenset(struct.pack("!HHH", an, ns, ar) for an in (0, 1) for ns in (0, 1) for ar in (0, 1))


def _network(text: str, directive: Directive, line: int) -> Network:
    """A ``prefer`` CIDR; as Go's net.ParseCIDR, a prefix length is required and host
    bits are ignored."""
    try:
        if "/" not in text:
            raise ValueError
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise directive.error(f'prefer: invalid CIDR "{text}"', line=line) from None
    return (network.max_prefixlen // 8, int(network.network_address), int(network.netmask))


# -- the order of one section ------------------------------------------------------------


def section_order(
    types: Sequence[int], prefer: Sequence[Network] = (), address: Callable[[int], bytes] | None = None
) -> list[int] | None:
    """The new order of a section's records as indices into ``types``, or None if unchanged.

    ``prefer`` applies only when ``address`` (index -> the A/AAAA record's RDATA) is given:
    CoreDNS prefers in the answer and additional sections, not in the authority section.
    """
    count = len(types)
    if count < 2:
        return None
    cnames: list[int] = []
    others: list[int] = []
    addresses: list[int] = []
    exchanges: list[int] = []
    last: list[int] = []
    for index, rtype in enumerate(types):
        if rtype in _ADDRESS_TYPES:
            addresses.append(index)
        elif rtype == TYPE_CNAME:
            cnames.append(index)
        elif rtype == TYPE_MX:
            exchanges.append(index)
        elif rtype in _LAST:
            last.append(index)
        else:
            others.append(index)
    if len(addresses) > 1:
        shuffle(addresses)
    if len(exchanges) > 1:
        shuffle(exchanges)
    if prefer and address is not None:
        order = cnames + _preferred(addresses, prefer, address) + exchanges + others + last
    else:
        order = cnames + others + addresses + exchanges + last
    return None if order == list(range(count)) else order


def _preferred(indices: list[int], prefer: Sequence[Network], address: Callable[[int], bytes]) -> list[int]:
    """Addresses in the first preferred network first, then the second's, ...; the rest
    after, each group in its shuffled order (a stable sort on the first network matched)."""
    unmatched = len(prefer)

    def rank(index: int) -> int:
        raw = address(index)
        size = len(raw)
        value = int.from_bytes(raw, "big")
        for position, (length, network, mask) in enumerate(prefer):
            if size == length and value & mask == network:
                return position
        return unmatched

    return sorted(indices, key=rank)


# -- dnslib messages ---------------------------------------------------------------------


def reorder_message(message: DNSRecord, prefer: Sequence[Network] = ()) -> DNSRecord | None:
    """A new message with the sections reordered, or None when no record moves.

    The records and lists of ``message`` are not modified: a plugin may hand out records
    it keeps (a zone's), and the reply may already have been packed from it.
    """
    answers = _reordered(message.rr, prefer, True)
    authority = _reordered(message.auth, prefer, False)
    additional = _reordered(message.ar, prefer, True)
    if answers is None and authority is None and additional is None:
        return None
    return DNSRecord(
        message.header,
        questions=list(message.questions),
        rr=answers if answers is not None else list(message.rr),
        auth=authority if authority is not None else list(message.auth),
        ar=additional if additional is not None else list(message.ar),
    )


def _reordered(records: list, prefer: Sequence[Network], may_prefer: bool) -> list | None:
    def address(index: int) -> bytes:
        return bytes(records[index].rdata.data)

    order = section_order([record.rtype for record in records], prefer, address if may_prefer else None)
    return None if order is None else [records[index] for index in order]


# -- wire bytes --------------------------------------------------------------------------


def reorder_wire(packed: bytes, prefer: Sequence[Network] = ()) -> bytes | None:
    """``packed`` with its records reordered by slicing whole records, ``packed`` itself
    when nothing moves, or None when moving records would break compression pointers.

    A compression pointer is an absolute offset into the message. Moving whole records
    keeps the length of each section, so every record that keeps its offset still holds
    the same bytes there; a pointer is only broken when its target lies inside a record
    that moves. Every name of every record is checked for such a pointer (the owner, and
    the names inside RDATA for the types that carry one). A record of a type whose RDATA
    this function cannot read might hide a pointer, so such a message is refused (None)
    and the caller lets dnslib decompress and pack it again.

    Typical replies are safe: owners point at the question, or into a CNAME that stays
    first. MX records with glue in the additional section are not (glue owners point into
    the MX data), nor are repeated owners that first appear in a moving record.
    """
    _id, _flags, qdcount, ancount, nscount, arcount = wire.HEADER.unpack_from(packed)
    size = len(packed)
    offset = wire.HEADER_SIZE
    targets: list[int] = []  # where every compression pointer in the message points
    for _ in range(qdcount):
        offset = _walk_name(packed, offset, targets) + 4
    records_start = offset
    starts: list[int] = []
    ends: list[int] = []
    types: list[int] = []
    fixed = wire.RR_FIXED.unpack_from
    for _ in range(ancount + nscount + arcount):
        starts.append(offset)
        if packed[offset] >= 0xC0:  # the usual owner: one pointer (to the question)
            targets.append(((packed[offset] & 0x3F) << 8) | packed[offset + 1])
            offset += 2
        else:
            offset = _walk_name(packed, offset, targets)
        rtype, _class, _ttl, rdlength = fixed(packed, offset)
        rdata = offset + 10
        offset = rdata + rdlength
        if offset > size:
            raise wire.WireError("resource data runs past the end of the packet")
        if rtype not in _NO_NAMES:
            names = _RDATA_NAMES.get(rtype)
            if names is None:
                return None
            skip, count = names
            position = rdata + skip
            for _ in range(count):
                position = _walk_name(packed, position, targets)
            if position > offset:
                raise wire.WireError("name runs past its record's data")
        types.append(rtype)
        ends.append(offset)

    def address(index: int) -> bytes:
        return packed[starts[index] : ends[index]][-(4 if types[index] == TYPE_A else 16) :]

    order: list[int] = []
    changed = False
    for first, last, may_prefer in (
        (0, ancount, True),
        (ancount, ancount + nscount, False),
        (ancount + nscount, ancount + nscount + arcount, True),
    ):
        section = None
        if last - first > 1:
            section = section_order(
                types[first:last], prefer, (lambda index, base=first: address(base + index)) if may_prefer else None
            )
        if section is None:
            order.extend(range(first, last))
        else:
            order.extend([first + index for index in section])
            changed = True
    if not changed:
        return packed

    pieces: list[bytes] = []
    moved: list[tuple[int, int]] = []  # old (start, end) of records that change offset
    lowest = 0  # the first offset whose bytes change: every moved record starts at or after it
    position = records_start
    for index in order:
        start, end = starts[index], ends[index]
        if start != position:
            if not moved:
                lowest = position
            moved.append((start, end))
        pieces.append(packed[start:end])
        position += end - start
    for target in targets:
        if target >= lowest:
            for start, end in moved:
                if start <= target < end:
                    return None
    return packed[:records_start] + b"".join(pieces) + packed[offset:]


def _walk_name(packed: bytes, offset: int, targets: list[int]) -> int:
    """The offset past the name at ``offset``; a compression pointer's target is added
    to ``targets``."""
    size = len(packed)
    while True:
        if offset >= size:
            raise wire.WireError("name runs past the end of the packet")
        length = packed[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            if offset + 2 > size:
                raise wire.WireError("truncated compression pointer")
            targets.append(((length & 0x3F) << 8) | packed[offset + 1])
            return offset + 2
        if length & 0xC0:
            raise wire.WireError("unknown label type")
        offset += 1 + length
