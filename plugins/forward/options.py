"""forward's Corefile syntax: FROM, the TO list (addresses and resolv.conf files), the block.

Everything a user can get wrong is reported here, once, as ``file:line: forward: problem``,
so that the running plugin never meets a bad address, a missing certificate or an
unknown policy.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from resolver.config import parse_key
from resolver.corefile import CorefileError, Directive, Token, port_number
from resolver.dnsnames import RCODE_NAMES
from resolver.logs import plugin_logger
from resolver.plugin import expect_args, parse_duration, parse_int, raise_unknown_option

log = plugin_logger("forward")

MAX_UPSTREAMS = 15  # CoreDNS's limit on TO addresses
DNS_PORT = 53
TLS_PORT = 853
POLICIES = ("random", "round_robin", "sequential")
_UNSUPPORTED_SCHEMES = ("https", "grpc", "quic", "https3", "unix", "grpcs", "h3")
_RCODES = {name: code for code, name in RCODE_NAMES.items()} | {"BADVERS": 16}


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream as configured: the public contract other plugins (loop) read.

    ``source`` says how the user wrote it: the TO argument (``127.0.0.1:53``,
    ``tls://9.9.9.9``) or, for an address read from a resolv.conf style file, the file,
    line and text (``/etc/resolv.conf line 3: nameserver 127.0.0.53``).
    """

    host: str  # an IP address, without brackets; IPv6 may carry a %scope
    port: int
    transport: str  # "dns" or "tls"
    source: str

    @property
    def address(self) -> str:
        """``host:port`` as CoreDNS prints it (``[::1]:53`` for IPv6): the ``to`` label."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(slots=True)
class Options:
    """The parsed directive; defaults are CoreDNS's."""

    zone: str = "."
    targets: list[Target] = field(default_factory=list)
    #: Per-target TLS server names from ``tls://IP%NAME`` (index -> name).
    server_names: dict[int, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    force_tcp: bool = False
    prefer_udp: bool = False
    expire: float = 10.0
    max_fails: int = 2
    read_timeout: float = 2.0
    max_connect_attempts: int | None = None  # None: two per upstream (CoreDNS's default)
    tls_args: list[str] | None = None  # the ``tls`` line's files (absolute), when given
    tls_servername: str = ""
    policy: str = "random"
    health_check: float = 0.5
    health_check_rd: bool = True
    health_check_domain: str = "."
    max_concurrent: int = 0
    next_rcodes: frozenset[int] = frozenset()
    next_on_nodata: bool = False
    failover_rcodes: frozenset[int] = frozenset()
    failfast: bool = False
    tls_context: ssl.SSLContext | None = None


def parse(directive: Directive) -> Options:
    """The ``forward`` directive (line and block) as ``Options``; raises ``CorefileError``."""
    args = expect_args(directive, 2)
    options = Options(zone=_zone(args[0], directive))
    for option in directive.children:
        _parse_option(option, options, directive)
    targets, server_names = _targets(args[1:], directive)
    if len(targets) > MAX_UPSTREAMS:
        raise directive.error(f"more than {MAX_UPSTREAMS} TOs configured: {len(targets)}")
    if options.tls_servername and server_names:
        raise directive.error(
            f'both tls_servername ("{options.tls_servername}") and a per-address server name (tls://IP%NAME) are set'
        )
    options.targets = targets
    options.server_names = server_names
    if options.tls_args is not None or any(target.transport == "tls" for target in targets):
        options.tls_context = _tls_context(options.tls_args or [], directive)
    return options


# -- FROM and except ------------------------------------------------------------------------


def _zone(text: str, directive: Directive) -> str:
    """FROM as a zone; a network stands for its first reverse zone, as in CoreDNS."""
    zones = _zones(text, directive)
    if len(zones) > 1:
        log.warning("Unsupported CIDR notation: '%s' expands to multiple zones. Using only '%s'.", text, zones[0])
    return zones[0]


def _zones(text: str, directive: Directive) -> list[str]:
    try:
        return [key.zone for key in parse_key(Token(text, directive.file, directive.line), 0)]
    except CorefileError:
        raise directive.error(f'invalid zone "{text}"') from None


# -- the block --------------------------------------------------------------------------------


def _parse_option(option: Directive, options: Options, directive: Directive) -> None:
    name = option.name
    if option.block:
        raise option.error("takes no block")
    if name == "except":
        for text in expect_args(option, 1):
            options.ignored.extend(zone for zone in _zones(text, option) if zone not in options.ignored)
    elif name in ("force_tcp", "prefer_udp", "failfast_all_unhealthy_upstreams", "next_on_nodata"):
        expect_args(option, 0, 0)
        attribute = {"failfast_all_unhealthy_upstreams": "failfast"}.get(name, name)
        setattr(options, attribute, True)
    elif name == "expire":
        options.expire = parse_duration(expect_args(option, 1, 1)[0], option)
    elif name == "read_timeout":
        options.read_timeout = parse_duration(expect_args(option, 1, 1)[0], option)
        if options.read_timeout <= 0:
            raise option.error("must be positive")
    elif name == "max_fails":
        options.max_fails = parse_int(expect_args(option, 1, 1)[0], option, 0, 2**32 - 1)
    elif name == "max_connect_attempts":
        options.max_connect_attempts = parse_int(expect_args(option, 1, 1)[0], option, 0, 2**32 - 1)
    elif name == "max_concurrent":
        options.max_concurrent = parse_int(expect_args(option, 1, 1)[0], option, 0)
    elif name == "policy":
        policy = expect_args(option, 1, 1)[0]
        if policy not in POLICIES:
            raise option.error(f"unknown policy '{policy}' (use random, round_robin or sequential)")
        options.policy = policy
    elif name == "health_check":
        _health_check(option, options)
    elif name == "tls":
        options.tls_args = [_resolve_path(path, option.file) for path in expect_args(option, 0, 3)]
    elif name == "tls_servername":
        options.tls_servername = expect_args(option, 1, 1)[0]
    elif name == "next":
        options.next_rcodes = frozenset(_rcode(text, option) for text in expect_args(option, 1))
    elif name == "failover":
        rcodes = frozenset(_rcode(text, option) for text in expect_args(option, 1))
        if 0 in rcodes:
            raise option.error("NOERROR cannot be used in failover")
        options.failover_rcodes = rcodes
    else:
        raise raise_unknown_option(directive, option)


def _health_check(option: Directive, options: Options) -> None:
    """``health_check DURATION [no_rec] [domain NAME]``."""
    args = expect_args(option, 1)
    options.health_check = parse_duration(args[0], option)
    rest = iter(args[1:])
    for word in rest:
        if word == "no_rec":
            options.health_check_rd = False
        elif word == "domain":
            domain = next(rest, None)
            if domain is None:
                raise option.error("domain needs a name")
            options.health_check_domain = _domain(domain, option)
        else:
            raise option.error(f"unknown option {word}")


def _domain(text: str, option: Directive) -> str:
    name = text.lower().rstrip(".") + "."
    if name == ".":
        return name
    labels = name[:-1].split(".")
    if len(name) > 254 or any(not label or len(label) > 63 for label in labels) or not name.isascii():
        raise option.error(f"invalid domain name {text}")
    return name


def _rcode(text: str, option: Directive) -> int:
    code = _RCODES.get(text.upper())
    if code is None:
        raise option.error(f"{text} is not a valid rcode")
    return code


# -- TO -------------------------------------------------------------------------------------


def _targets(texts: list[str], directive: Directive) -> tuple[list[Target], dict[int, str]]:
    """Every TO as targets, in order, files expanded, duplicates dropped (first one wins)."""
    targets: list[Target] = []
    server_names: dict[int, str] = {}
    seen: set[tuple[str, int, str]] = set()
    for text in texts:
        for target, server_name in _target(text, directive):
            key = (target.host.lower(), target.port, target.transport)
            if key in seen:
                continue
            seen.add(key)
            if server_name:
                server_names[len(targets)] = server_name
            targets.append(target)
    if not targets:
        raise directive.error("no valid upstream addresses found")
    return targets, server_names


def _target(text: str, directive: Directive) -> list[tuple[Target, str]]:
    """One TO argument: ``IP``, ``IP:PORT``, ``[IPv6]:PORT``, ``dns://...``, ``tls://...``
    (``tls://IP%NAME`` names the TLS server), or a resolv.conf style file."""
    transport, rest = "dns", text
    scheme, separator, after = text.partition("://")
    if separator:
        scheme = scheme.lower()
        if scheme in _UNSUPPORTED_SCHEMES:
            raise directive.error(f"'{scheme}' is not supported as a destination protocol in forward: {text}")
        if scheme not in ("dns", "tls"):
            raise directive.error(f'unknown protocol "{scheme}" in "{text}" (use dns:// or tls://)')
        transport, rest = scheme, after
    if not rest:
        raise directive.error(f'invalid address: "{text}"')
    server_name = ""
    if transport == "tls" and "%" in rest:
        rest, server_name = _split_server_name(rest)
    default_port = TLS_PORT if transport == "tls" else DNS_PORT
    address = _host_port(rest, default_port)
    if address is not None:
        host, port_text = address
        if not port_number(port_text):  # None, or port 0: nothing to send to
            raise directive.error(f'invalid port "{port_text}" in "{text}"')
        _check_scope(host, text, directive)
        return [(Target(host, int(port_text), transport, text), server_name)]
    if separator:
        raise directive.error(f'not an IP address: "{text}"')
    return [(target, "") for target in _resolv_conf(rest, directive)]


def _split_server_name(rest: str) -> tuple[str, str]:
    """``IP%NAME[:PORT]`` -> (``IP[:PORT]``, NAME), as CoreDNS's splitZone reads it."""
    head, _, zone = rest.rpartition("%")
    port = ""
    if ":" in zone:
        zone, _, port = zone.rpartition(":")
        zone = zone.rstrip("]")
    if head.startswith("["):
        head += "]"
    return (f"{head}:{port}" if port else head), zone


def _host_port(text: str, default_port: int) -> tuple[str, str] | None:
    """(host, port text) when ``text`` is an IP address with or without a port, else None."""
    if text.startswith("["):
        inside, bracket, after = text[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            return None
        host, port = inside, after[1:] if after else str(default_port)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(default_port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, port


def _resolv_conf(path_text: str, directive: Directive) -> list[Target]:
    """The ``nameserver`` lines of a resolv.conf style file, each on port 53.

    A relative path is taken from the Corefile's directory. As glibc (and CoreDNS) read
    it, only lines whose first word is ``nameserver`` count; the address must be an IP.
    """
    path = _resolve_path(path_text, directive.file)
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise directive.error(f'not an IP address or file: "{path_text}"') from None
    except OSError as exc:
        raise directive.error(f'cannot read "{path}": {exc.strerror or exc}') from None
    targets = []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            ipaddress.ip_address(words[1])
        except ValueError:
            raise directive.error(f'{path} line {number}: nameserver "{words[1]}" is not an IP address') from None
        source = f"{path} line {number}: {line.strip()}"
        _check_scope(words[1], source, directive)
        targets.append(Target(words[1], DNS_PORT, "dns", source))
    if not targets:
        log.warning("%s: no nameserver lines", path)
    return targets


def _check_scope(host: str, source: str, directive: Directive) -> None:
    """An IPv6 scope (``fe80::1%eth0``) must name an interface the socket layer knows."""
    if "%" not in host:
        return
    try:
        socket.getaddrinfo(host, DNS_PORT, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except OSError:
        raise directive.error(f'invalid address "{source}": unknown interface in "{host}"') from None


def _resolve_path(path: str, corefile: str) -> str:
    if os.path.isabs(path):
        return path
    base = Path.cwd() if corefile in ("", "stdin") else Path(corefile).resolve().parent
    return str(base / path)


# -- TLS ------------------------------------------------------------------------------------


def _tls_context(files: list[str], directive: Directive) -> ssl.SSLContext:
    """CoreDNS's ``tls`` arguments: none (system CAs), CA, CERT KEY, or CERT KEY CA.

    The server certificate is always verified, against the server name (``tls_servername``,
    else the address itself, as Go's TLS client does).
    """
    cert = key = ca = None
    if len(files) == 1:
        (ca,) = files
    elif len(files) == 2:
        cert, key = files
    elif len(files) == 3:
        cert, key, ca = files
    for path in files:
        if not os.path.isfile(path):
            raise directive.error(f"tls: cannot read {path}: no such file")
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert and key:
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise directive.error(f"tls: {exc}") from None
    return context
