"""acl: allow, block, filter or drop queries by client address and query type.

Syntax::

    acl [ZONES...] {
        ACTION [type QTYPE...] [net SOURCE...]
    }

ACTION is ``allow``, ``block`` (REFUSED), ``filter`` (NOERROR with no records) or
``drop`` (no reply at all). ``type`` lists query types (``A``, ``AAAA``, ``TYPE65``...;
``*`` or no ``type`` means every type), ``net`` lists client networks in CIDR notation or
single addresses, IPv4 or IPv6 (``*`` or no ``net`` means every address). The rules of
a block are tried in order and the first whose type and net both match decides; a query
that matches none is allowed. ZONES restrict the block to queries for names inside them
(default: the server block's zones); other queries go on unchecked.

As in CoreDNS the directive may be repeated in a server block and all its blocks act as
one list, in Corefile order: the first ``acl`` whose zones hold the query name and which
has a matching rule decides, and ``allow`` ends the checking. The client address is the
packet's source address, not a client behind a forwarder or NAT.

Blocked and filtered replies carry an Extended DNS Error (RFC 8914: 15 Blocked,
17 Filtered) when the query used EDNS. Metrics, as CoreDNS's:
``coredns_acl_{blocked,filtered,dropped}_requests_total{server,zone,view}`` and
``coredns_acl_allowed_requests_total{server,view}`` (every query that went on, the
ones outside the acl's zones included).

Not supported: a ``file`` section (a list of networks read from a file). It appeared in
the acl plugin's early drafts and was removed before CoreDNS released it, so CoreDNS
rejects it too; this server says so in its error.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Awaitable
from dataclasses import dataclass

from dnslib import QTYPE

from resolver import wire
from resolver.config import ServerBlock, reverse_zones
from resolver.corefile import Directive, Token
from resolver.logs import plugin_logger
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request

log = plugin_logger("acl")

NONE, ALLOW, BLOCK, FILTER, DROP = range(5)
ACTIONS = {"allow": ALLOW, "block": BLOCK, "filter": FILTER, "drop": DROP}

# RFC 8914 Extended DNS Error info codes, as CoreDNS sends them.
EDE_OPTION = 15
EDE_BLOCKED = 15
EDE_FILTERED = 17

#: How many client addresses keep their precomputed matches; past it the table restarts.
#: A node-local cache sees the pods of one node, far fewer.
MAX_CACHED_CLIENTS = 4096
_UNPARSABLE = -1  # the match mask of a client address that is not an IP address

#: A network as (address length in octets, network as an integer, netmask).
Network = tuple[int, int, int]


@dataclass(slots=True)
class Policy:
    """One ``ACTION [type ...] [net ...]`` line."""

    action: int
    qtypes: frozenset[int] | None  # None: every type
    networks: tuple[Network, ...] | None  # None: every address
    bit: int = 0  # this policy's bit in a client's match mask (numbered in ``connect``)


@dataclass(slots=True)
class Rule:
    """One ``acl`` directive: its zones and its policies in order."""

    zones: frozenset[str] | None  # None: the server block's zones
    policies: list[Policy]


class Acl(Plugin):
    name = "acl"
    repeatable = True

    def __init__(self, rules: list[Rule], block: ServerBlock) -> None:
        self.rules = rules
        self.matches: dict[str, int] = {}  # client IP -> mask of the policies whose net holds it
        metrics = block.runtime.metrics
        labels = ("server", "zone", "view")
        self.blocked = metrics.counter(
            "coredns_acl_blocked_requests_total", "Counter of DNS requests being blocked.", labels
        )
        self.filtered = metrics.counter(
            "coredns_acl_filtered_requests_total", "Counter of DNS requests being filtered.", labels
        )
        self.dropped = metrics.counter(
            "coredns_acl_dropped_requests_total", "Counter of DNS requests being dropped.", labels
        )
        self.allowed = metrics.counter(
            "coredns_acl_allowed_requests_total", "Counter of DNS requests being allowed.", ("server", "view")
        )

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Acl:
        zones = _zones(directive, block) if directive.args else None
        policies = [_policy(directive, line) for line in directive.children]
        return cls([Rule(zones, policies)], block)

    def connect(self, block: ServerBlock) -> None:
        instances = block.find_all(self.name)
        if instances[0] is not self:
            # CoreDNS runs every acl of a block as one plugin: the first instance takes the
            # rules of all of them, the others pass queries straight on at no cost.
            self.serve = _pass_on  # type: ignore[method-assign]
            return
        self.rules = [rule for instance in instances for rule in instance.rules]  # type: ignore[attr-defined]
        for bit, policy in enumerate(policy for rule in self.rules for policy in rule.policies):
            policy.bit = bit

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        mask: int | None = None
        for rule in self.rules:
            if rule.zones is None:
                zone = req.zone  # routing already found the longest block zone holding the name
            else:
                found = _longest_zone(req.qname, rule.zones)
                if found is None:
                    continue
                zone = found
            if mask is None:
                client = req.remote_ip
                mask = self.matches.get(client)
                if mask is None:
                    mask = self._match(client)
            action = _decide(rule.policies, req.qtype, mask)
            if action == NONE:
                continue
            if action == ALLOW:
                break
            labels = (req.server, zone, "")
            if action == DROP:
                self.dropped.inc(labels)
                return None
            if action == BLOCK:
                self.blocked.inc(labels)
                return Reply(wire=refusal(req, wire.REFUSED, EDE_BLOCKED), plugin=self.name)
            self.filtered.inc(labels)
            return Reply(wire=refusal(req, wire.NOERROR, EDE_FILTERED), plugin=self.name)
        self.allowed.inc((req.server, ""))
        return await next(req)

    def _match(self, client: str) -> int:
        """The mask of the policies whose networks hold ``client``, remembered per address."""
        try:
            address = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            log.error("Blocking request. Unable to parse source address: %s", client)
            return _UNPARSABLE  # not remembered: the log line should repeat, as CoreDNS's does
        size = address.max_prefixlen // 8
        value = int(address)
        mask = 0
        for rule in self.rules:
            for policy in rule.policies:
                if policy.networks is None or any(
                    length == size and value & netmask == network for length, network, netmask in policy.networks
                ):
                    mask |= 1 << policy.bit
        if len(self.matches) >= MAX_CACHED_CLIENTS:
            self.matches.clear()
        self.matches[client] = mask
        return mask


def _pass_on(req: Request, next: Handler) -> Awaitable[Reply | None]:
    """The rest of the chain's awaitable, returned as is: no coroutine frame of our own."""
    return next(req)


def _decide(policies: list[Policy], qtype: int, mask: int) -> int:
    """The action of the first policy matching type and client, or NONE."""
    if mask == _UNPARSABLE:
        return BLOCK
    for policy in policies:
        qtypes = policy.qtypes
        if (qtypes is None or qtype in qtypes) and mask >> policy.bit & 1:
            return policy.action
    return NONE


def _longest_zone(qname: str, zones: frozenset[str]) -> str | None:
    name = qname
    while True:
        if name in zones:
            return name
        if name == ".":
            return None
        name = name[name.find(".") + 1 :] or "."


def refusal(req: Request, rcode: int, ede: int) -> bytes:
    """An empty reply with ``rcode``; with an EDE option in the OPT record when the query
    had EDNS (a query without EDNS gets no OPT record at all, RFC 6891 7)."""
    packed = wire.error_reply(req.wire, rcode, req.question.end)
    if not req.edns:
        return packed
    ttl = wire.EDNS_DO if req.do else 0
    option = struct.pack("!HHH", EDE_OPTION, 2, ede)
    opt = b"\x00" + wire.RR_FIXED.pack(wire.TYPE_OPT, wire.ADVERTISED_UDP_SIZE, ttl, len(option)) + option
    return packed[:10] + b"\x00\x01" + packed[12:] + opt


# -- parsing ------------------------------------------------------------------------------


def _zones(directive: Directive, block: ServerBlock) -> frozenset[str]:
    zones: set[str] = set()
    for text in directive.args:
        if "/" in text:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise directive.error(f'invalid zone "{text}": not a network') from None
            zones.update(reverse_zones(text, Token(text, directive.file, directive.line)))
            continue
        name = text.lower().rstrip(".") + "." if text != "." else "."
        if name != "." and any(not label for label in name[:-1].split(".")):
            raise directive.error(f'invalid zone "{text}"')
        zones.add(name)
    return frozenset(zones)


def _policy(directive: Directive, line: Directive) -> Policy:
    action = ACTIONS.get(line.name.lower())
    if action is None:
        raise directive.error(
            f"unexpected token \"{line.name}\"; expect 'allow', 'block', 'filter' or 'drop'", line=line.line
        )
    if line.block is not None:
        raise directive.error(f"{line.name} takes no block", line=line.line)
    qtypes: set[int] | None = set()
    networks: list[Network] | None = []
    seen_type = seen_net = False
    args = line.args
    index = 0
    while index < len(args):
        section = args[index].lower()
        if section == "file":
            raise directive.error(
                "file sources are not supported (CoreDNS's acl has none either): list networks with net",
                line=line.line,
            )
        if section not in ("type", "net"):
            raise directive.error(f"unexpected token \"{args[index]}\"; expect 'type' or 'net'", line=line.line)
        index += 1
        tokens: list[str] = []
        while index < len(args) and args[index].lower() not in ("type", "net"):
            tokens.append(args[index])
            index += 1
        if not tokens:
            raise directive.error(f'no token specified in "{section}" section', line=line.line)
        if section == "type":
            seen_type = True
            qtypes = _qtypes(tokens, qtypes, directive, line.line)
        else:
            seen_net = True
            networks = _networks(tokens, networks, directive, line.line)
    return Policy(
        action,
        frozenset(qtypes) if seen_type and qtypes is not None else None,
        tuple(networks) if seen_net and networks is not None else None,
    )


def _qtypes(tokens: list[str], qtypes: set[int] | None, directive: Directive, line: int) -> set[int] | None:
    """Add the types named by ``tokens``; None once ``*`` (every type) is seen."""
    for token in tokens:
        if token == "*":
            return None  # as CoreDNS: "*" matches every type and ends the list
        qtype = _qtype(token, directive, line)
        if qtypes is not None:
            qtypes.add(qtype)
    return qtypes


def _qtype(token: str, directive: Directive, line: int) -> int:
    name = token.upper()
    value = QTYPE.reverse.get(name)
    if value is None and name.startswith("TYPE") and name[4:].isdigit() and int(name[4:]) < 65536:
        value = int(name[4:])
    if value is None:
        raise directive.error(f'unexpected token "{token}"; expect legal QTYPE', line=line)
    return value


def _networks(
    tokens: list[str], networks: list[Network] | None, directive: Directive, line: int
) -> list[Network] | None:
    """Add the networks in ``tokens``; None once ``*`` (every address) is seen."""
    for token in tokens:
        if token == "*":
            return None  # as CoreDNS: "*" matches every IPv4 and IPv6 address and ends the list
        text = token if "/" in token else token + ("/128" if ":" in token else "/32")
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise directive.error(f'illegal CIDR notation "{token}"', line=line) from None
        if networks is not None:
            networks.append((network.max_prefixlen // 8, int(network.network_address), int(network.netmask)))
    return networks
