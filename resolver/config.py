"""From parsed Corefile to runnable configuration: zones, ports and plugin chains.

``load`` turns ``ServerBlockSpec``s into ``ServerBlock``s: each key becomes one or more
``ZoneKey``s (a CIDR key becomes its reverse zones), each directive becomes a plugin
instance through the registry, and the instances are linked into one handler chain in
the registry's fixed order. Nothing here opens a socket; ``resolver.server`` does that.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from resolver import wire
from resolver.corefile import CorefileError, Directive, ServerBlockSpec, Token, canonical, parse, port_number
from resolver.plugin import Handler, Plugin, Registry
from resolver.reply import Reply
from resolver.request import Request
from resolver.runtime import Runtime

DEFAULT_PORT = 53
WILDCARD_HOSTS = ("0.0.0.0", "::")
_SCHEMES = ("dns://", "tls://", "https://", "grpc://", "quic://", "grpcs://", "h3://")


@dataclass(frozen=True, slots=True)
class ZoneKey:
    """One zone a server block serves, on one port."""

    zone: str  # lower case, final dot; "." for the root
    port: int

    def __str__(self) -> str:
        return f"{self.zone}:{self.port}"


def parse_key(token: Token, default_port: int) -> list[ZoneKey]:
    """A server block key (``example.org:1053``, ``dns://.``, ``10.0.0.0/24``) as zones."""
    text = token.text.strip()
    lower = text.lower()
    for scheme in _SCHEMES:
        if lower.startswith(scheme):
            if scheme != "dns://":
                raise token.error(f'transport "{scheme[:-3]}" is not supported (only dns://)')
            text = text[len(scheme) :]
            break
    port = default_port
    cidr_port = re.fullmatch(r"(.+/\d+):(\d+)", text)
    if cidr_port:
        text, port = cidr_port.group(1), _port(cidr_port.group(2), token)
    elif "/" not in text and text.count(":") == 1:
        text, port_text = text.split(":")
        port = _port(port_text, token)
    if "/" in text:
        return [ZoneKey(zone, port) for zone in reverse_zones(text, token)]
    zone = _zone_name(text or ".", token)
    return [ZoneKey(zone, port)]


def zone_arguments(args: Sequence[str], directive: Directive) -> list[str]:
    """A plugin's ZONES arguments, read as server block keys read them (lower case, final
    dot; ``10.0.0.0/24`` is its reverse zone), without repeats."""
    zones: list[str] = []
    for text in args:
        try:
            keys = parse_key(Token(text, directive.file, directive.line), 0)
        except CorefileError:
            raise directive.error(f'invalid zone "{text}"') from None
        zones.extend(key.zone for key in keys if key.zone not in zones)
    return zones


def _port(text: str, token: Token) -> int:
    port = port_number(text)
    if port is None:
        raise token.error(f'invalid port "{text}" in server block key "{token.text}"')
    return port


def _zone_name(text: str, token: Token) -> str:
    if text == ".":
        return "."
    name = text.lower().rstrip(".") + "."
    labels = name[:-1].split(".")
    bad = any(not label or len(label) > 63 for label in labels) or len(name) > 254
    if bad or any(char in name for char in ":[]/\\") or not name.isprintable():
        raise token.error(f'invalid zone name "{text}"')
    return name


def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address without its ``%scope``, an IPv4-mapped IPv6 address as the IPv4
    address it maps (as Go's net.IP compares them); None when ``text`` is no address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def reverse_zones(cidr: str, token: Token) -> list[str]:
    """The reverse zones of a network, widened to label boundaries.

    ``10.0.0.0/24`` is ``0.0.10.in-addr.arpa.``; a prefix that does not end on an octet
    (IPv4) or nibble (IPv6) boundary becomes every zone of the next longer boundary that
    it covers, so ``10.0.0.0/23`` serves ``0.0.10.in-addr.arpa.`` and ``1.0.10.in-addr.arpa.``.
    """
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise token.error(f'invalid network "{cidr}" in server block key') from None
    step = 8 if network.version == 4 else 4
    boundary = -(-network.prefixlen // step) * step
    zones = []
    for subnet in network.subnets(new_prefix=boundary) if boundary > network.prefixlen else [network]:
        labels = subnet.network_address.reverse_pointer.split(".")
        suffix = 2  # "in-addr.arpa" / "ip6.arpa"
        keep = boundary // step
        zones.append(".".join(labels[len(labels) - suffix - keep :]) + ".")
    return zones


class ServerBlock:
    """A server block ready to serve: its zones, its plugins in order, and its chain."""

    def __init__(self, keys: list[ZoneKey], file: str, line: int, runtime: Runtime) -> None:
        self.keys = keys
        self.runtime = runtime  # process-wide services: stats, HTTP endpoints, reload
        self.file = file
        self.line = line
        self.zones = list(dict.fromkeys(key.zone for key in keys))
        self.plugins: list[Plugin] = []
        self.handler: Handler = end_of_chain
        #: Addresses to listen on; empty means every address. The bind plugin fills it.
        self.hosts: list[str] = []
        #: Each key's port as actually bound (port 0 becomes the one the kernel picked);
        #: filled by the server once it listens, before any plugin starts.
        self.bound_ports: dict[int, int] = {}
        #: The whole configuration this block belongs to (set once all blocks exist).
        self.config: Config | None = None

    def find(self, name: str) -> Plugin | None:
        """The first plugin of this block with directive ``name``, if any."""
        for plugin in self.plugins:
            if plugin.name == name:
                return plugin
        return None

    def find_all(self, name: str) -> list[Plugin]:
        return [plugin for plugin in self.plugins if plugin.name == name]

    @property
    def listen_hosts(self) -> tuple[str, ...]:
        return tuple(self.hosts) if self.hosts else WILDCARD_HOSTS

    def link(self) -> None:
        """Chain the plugins: each one's ``next`` is the rest of the chain."""
        handler: Handler = end_of_chain
        for plugin in reversed(self.plugins):
            if type(plugin).serve is Plugin.serve or not plugin.in_chain:
                continue  # pure fall-through (bind, health, ready, reload): no frame per query
            # partial calls plugin.serve directly: no extra coroutine frame per plugin.
            handler = functools.partial(plugin.serve, next=handler)
        self.handler = handler

    def __repr__(self) -> str:
        return f"<ServerBlock {' '.join(map(str, self.keys))} {[p.name for p in self.plugins]}>"


async def end_of_chain(req: Request) -> Reply:
    """What runs when every plugin fell through: SERVFAIL, as in CoreDNS."""
    return Reply(
        wire=wire.error_reply(req.wire, wire.SERVFAIL, req.question.end, req.edns, req.do),
        error=f"no plugin answered {req.qname}",
    )


class Config:
    """A whole Corefile, set up: blocks in file order, and its parsed form for reload."""

    def __init__(self, blocks: list[ServerBlock], file: str, runtime: Runtime, canonical: str) -> None:
        self.blocks = blocks
        self.file = file
        self.runtime = runtime
        self.canonical = canonical  # the parsed Corefile (see corefile.canonical)

    @property
    def sha512(self) -> str:
        """Hash of the parsed Corefile: what reload compares and logs."""
        return hashlib.sha512(self.canonical.encode()).hexdigest()

    def plugins(self) -> Iterator[Plugin]:
        for block in self.blocks:
            yield from block.plugins

    def routes(self) -> dict[tuple[str, int], dict[str, ServerBlock]]:
        """For each listening (host, port): which block serves which zone."""
        table: dict[tuple[str, int], dict[str, ServerBlock]] = {}
        for block in self.blocks:
            for host in block.listen_hosts:
                for key in block.keys:
                    table.setdefault((host, key.port), {})[key.zone] = block
        return table


def load(
    text: str,
    file: str,
    registry: Registry,
    default_port: int = DEFAULT_PORT,
    environ: Mapping[str, str] | None = None,
    directory: Path | None = None,
    runtime: Runtime | None = None,
) -> Config:
    """Parse and set up a Corefile; every problem raises ``CorefileError`` (file:line).

    ``directory`` is where relative ``import`` patterns are looked up (the Corefile's own).
    ``runtime`` is the process's shared services; every reload passes the same one.
    """
    runtime = runtime if runtime is not None else Runtime()
    specs = parse(text, file, environ, directory)
    blocks = [_build_block(spec, registry, default_port, runtime) for spec in specs]
    if not blocks:
        raise CorefileError(file, 1, "no server blocks: the Corefile is empty")
    _check_duplicates(blocks)
    config = Config(blocks, file, runtime, canonical(specs))
    for block in blocks:
        block.config = config
    for block in blocks:
        for plugin in block.plugins:
            plugin.connect(block)
        block.link()
    return config


def _build_block(spec: ServerBlockSpec, registry: Registry, default_port: int, runtime: Runtime) -> ServerBlock:
    keys: list[ZoneKey] = []
    for token in spec.keys:
        for key in parse_key(token, default_port):
            if key in keys:
                raise token.error(f'zone "{key.zone}" on port {key.port} is listed twice in this server block')
            keys.append(key)
    block = ServerBlock(keys, spec.file, spec.line, runtime)
    seen: dict[str, int] = {}
    instances: list[tuple[int, int, Plugin]] = []
    for index, directive in enumerate(spec.directives):
        if directive.name not in registry:
            hint = registry.suggest(directive.name)
            suffix = f' (did you mean "{hint}"?)' if hint else ""
            raise CorefileError(directive.file, directive.line, f'unknown directive "{directive.name}"{suffix}')
        plugin_class = registry.load(directive.name)
        if directive.name in seen and not plugin_class.repeatable:
            raise directive.error(f"given twice in one server block (first at line {seen[directive.name]})")
        seen.setdefault(directive.name, directive.line)
        plugin = plugin_class.setup(directive, block)
        instances.append((registry.position(directive.name), index, plugin))
    block.plugins = [plugin for _pos, _index, plugin in sorted(instances, key=lambda item: item[:2])]
    return block


def _check_duplicates(blocks: list[ServerBlock]) -> None:
    """Two blocks may not serve the same zone on the same port and address."""
    seen: dict[tuple[str, int], list[tuple[str, ServerBlock]]] = {}
    for block in blocks:
        hosts = block.hosts or ["*"]
        for key in block.keys:
            claims = seen.setdefault((key.zone, key.port), [])
            for host in hosts:
                for other_host, other in claims:
                    if other is not block and (host == other_host or "*" in (host, other_host)):
                        raise CorefileError(
                            block.file,
                            block.line,
                            f'zone "{key.zone}" on port {key.port} is already served by the block at '
                            f"{other.file}:{other.line}",
                        )
            claims.extend((host, block) for host in hosts)
