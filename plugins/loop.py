"""loop: refuse to run a configuration that forwards queries back to this server.

Syntax::

    loop

No arguments. Two checks, both only in server blocks that say ``loop`` (as in CoreDNS,
where the probe exists only with the plugin):

* **At load** (and so at every reload): a forward target that is this server's own
  address on one of the block's ports (an address the block binds, or, when the block
  listens on every address, any 127.0.0.0/8 address, ``::1``, ``0.0.0.0`` or ``::``) is
  refused with a one-line Corefile error naming the target, where it came from (the
  resolv.conf line) and the fix. A reload that would loop keeps the old configuration.
* **At start and after every reload**: the plugin sends ``HINFO <random>.<random>.<zone>``
  (the block's first zone) to the block's own address and port, as CoreDNS does. When
  that query comes back to this plugin more than twice, the server forwards to itself,
  possibly through other servers: CoreDNS's line is logged at FATAL, followed by the
  forward target(s) that lead back here and the fix, and the process exits with status 1
  5 seconds later (so that a second server in the same circle catches it too).
  The looping copy is answered SERVFAIL, not forwarded again. Probing stops at the first
  answer that went through this chain and is not SERVFAIL (an upstream that is not up
  yet answers SERVFAIL, so a pair of servers started in either order is still caught),
  or after 30 seconds; from then on the plugin is one boolean test per query.

A plugin that forwards exposes ``targets``: objects with ``host``, ``port``,
``transport`` and ``source`` (how the user wrote it: ``/etc/resolv.conf line 3:
nameserver 127.0.0.53``), and the plugin's ``zone``; loop reads nothing else of it.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Protocol

from dnslib import QTYPE, DNSRecord

from resolver import wire
from resolver.config import WILDCARD_HOSTS, ServerBlock, ip_address
from resolver.corefile import CorefileError, Directive
from resolver.dnsnames import in_zone
from resolver.logs import FATAL, plugin_logger
from resolver.plugin import Handler, Plugin, no_arguments
from resolver.reply import Reply
from resolver.request import Request

log = plugin_logger("loop")

HINFO = int(QTYPE.HINFO)
PROBE_WINDOW = 30.0  # seconds the probe keeps trying (CoreDNS: 30s)
PROBE_TIMEOUT = 2.0  # wait for one probe's answer (miekg/dns Exchange's default)
PROBE_RETRY = 1.0  # pause between probes that got no usable answer (CoreDNS: 1s)
SEEN_LIMIT = 2  # a probe seen more often than this has looped (CoreDNS: "more than twice")
#: Seconds between the FATAL line and the exit. A loop through two servers is a loop for
#: both, but the one that sees it first would otherwise vanish before the other's next
#: probe (up to PROBE_TIMEOUT + PROBE_RETRY away) can come back to it: that one would then
#: see only an upstream that does not answer, and keep running.
LINGER = PROBE_TIMEOUT + PROBE_RETRY + 2.0
TROUBLESHOOTING = "https://coredns.io/plugins/loop#troubleshooting"
_SERVED_TRANSPORTS = ("dns", "udp", "tcp", "")  # what this server answers; tls:// cannot loop here


class Target(Protocol):
    """What loop reads of a forward target."""

    host: str
    port: int
    transport: str
    source: str


class Loop(Plugin):
    name = "loop"

    def __init__(self, directive: Directive, block: ServerBlock) -> None:
        self.file = directive.file
        self.line = directive.line
        self.block = block
        self.zone = block.keys[0].zone  # CoreDNS probes the first zone of the block only
        #: True once probing is over: serve() then only passes queries on.
        self.off = False
        self.detected = False
        #: Probe names sent so far and how often each came through this plugin.
        self.seen: dict[str, int] = {}
        self.address = ""  # where the probe goes, as CoreDNS prints it (":53" = every address)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Loop:
        no_arguments(directive)
        return cls(directive, block)

    def connect(self, block: ServerBlock) -> None:
        """Refuse a forward target that is this very server, before any packet is sent."""
        ports = {key.port for key in block.keys if key.port}
        for target in forward_targets(block):
            if target.port in ports and _transport(target) in _SERVED_TRANSPORTS and is_own_address(target.host, block):
                raise CorefileError(self.file, self.line, f"loop: {static_problem(target, block)}")

    async def serving(self) -> None:
        """This configuration now answers queries (at start, and after a reload's swap):
        a probe sent now goes through this very chain."""
        self._task = asyncio.get_running_loop().create_task(self._probe())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        if self.off:  # probing is over: the whole per-query cost
            return await next(req)
        if req.qtype != HINFO:
            return await next(req)
        name = req.qname
        count = self.seen.get(name)
        if count is None:
            return await next(req)  # not our probe
        self.seen[name] = count = count + 1
        if count > SEEN_LIMIT:
            if not self.detected:
                self._loop_detected(req, name)
            # Answer it here: forwarding it again only feeds the loop, and the prober
            # (and every server in the circle) gets its answer and lets go.
            return self.fail(req, wire.SERVFAIL, f'forwarding loop detected for "HINFO {name}"')
        return await next(req)

    # -- probing ---------------------------------------------------------------------------

    async def _probe(self) -> None:
        """Ask ourselves until an answer proves the path does not lead back here."""
        host, port = probe_destination(self.block)
        self.address = _printed_address(self.block, port)
        if port == 0:
            log.warning("Cannot probe zone %s for a loop: the port the server bound is not known", _quote(self.zone))
            self._finish()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROBE_WINDOW
        try:
            while loop.time() < deadline and not self.detected:
                # A fresh name per attempt: a copy of an earlier attempt still circling
                # can never add to the count of the current one.
                name = probe_name(self.zone)
                self.seen[name] = 0
                rcode = await exchange(host, port, name)
                if self.detected:
                    return
                # An answer counts only if the probe went through this plugin (else
                # someone else answers on that address) and is not SERVFAIL (the
                # upstream may simply not be up yet).
                if rcode is not None and rcode != wire.SERVFAIL and self.seen[name] > 0:
                    return
                await asyncio.sleep(PROBE_RETRY)
        finally:
            if not self.detected:
                self._finish()

    def _finish(self) -> None:
        """Probing is over: from now on loop costs one test per query, or nothing at all
        where the core leaves a plugin with ``in_chain`` False out of the chain."""
        self.off = True
        self.seen.clear()
        self.in_chain = False
        self.block.link()

    def _loop_detected(self, req: Request, name: str) -> None:
        self.detected = True
        source = _hostport(req.remote_ip, req.remote_port)
        message = (
            f"Loop ({source} -> {self.address}) detected for zone {_quote(self.zone)}, "
            f'see {TROUBLESHOOTING}. Query: "HINFO {name}"'
        )
        log.log(FATAL, message)
        log.log(FATAL, dynamic_explanation(self.block, name, req.remote_ip, self.address))
        fatal = self.block.runtime.fatal or exit_process
        if LINGER > 0:
            asyncio.get_running_loop().call_later(LINGER, fatal, message)
        else:
            fatal(message)


def exit_process(message: str) -> None:
    """Stop the process with status 1, as Go's log.Fatal does, once this callback returns.

    Used when no one set ``runtime.fatal``: SystemExit raised from a loop callback leaves
    ``asyncio.run`` (finally blocks run, so the pidfile is removed) and exits 1.
    """

    def leave() -> None:
        raise SystemExit(1)

    asyncio.get_running_loop().call_soon(leave)


async def exchange(host: str, port: int, name: str) -> int | None:
    """Send one HINFO query over UDP; its rcode, or None on timeout or a network error."""
    query = DNSRecord.question(name, "HINFO")
    query.header.id = secrets.randbelow(0x10000)
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Client(answered, query.header.id), remote_addr=(host, port)
        )
    except OSError:
        return None
    try:
        transport.sendto(query.pack())
        reply = await asyncio.wait_for(answered, PROBE_TIMEOUT)
    except (TimeoutError, OSError):
        return None
    finally:
        transport.close()
    return wire.rcode_of(reply)


class _Client(asyncio.DatagramProtocol):
    def __init__(self, answered: asyncio.Future[bytes], query_id: int) -> None:
        self.answered = answered
        self.query_id = query_id

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) >= wire.HEADER_SIZE and (data[0] << 8 | data[1]) == self.query_id and not self.answered.done():
            self.answered.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answered.done():
            self.answered.set_exception(exc)


def probe_name(zone: str) -> str:
    """``<random>.<random>.<zone>``: two 62-bit numbers, as CoreDNS draws them."""
    first, second = secrets.randbelow(1 << 62), secrets.randbelow(1 << 62)
    return f"{first}.{second}.{zone}" if zone != "." else f"{first}.{second}."


def probe_destination(block: ServerBlock) -> tuple[str, int]:
    """Where the block answers: its first bound address (127.0.0.1 or ::1 for a wildcard)
    and the port of its first key, as actually bound."""
    configured = block.keys[0].port
    port = block.bound_ports.get(configured, configured)
    host = block.listen_hosts[0]
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def _printed_address(block: ServerBlock, port: int) -> str:
    """The listening address as CoreDNS prints it: ``:53`` when on every address."""
    host = block.listen_hosts[0]
    return f":{port}" if host in WILDCARD_HOSTS else _hostport(host, port)


# -- which forward target loops ------------------------------------------------------------


def forward_targets(block: ServerBlock, name: str | None = None) -> list[Target]:
    """The targets of the block's forwarding plugins (those that expose ``targets``),
    only those forwarding ``name`` when given."""
    found: list[Target] = []
    for plugin in block.plugins:
        targets = getattr(plugin, "targets", None)
        if targets is None:
            continue
        if name is not None and not in_zone(name, getattr(plugin, "zone", ".")):
            continue
        found.extend(targets)
    return found


def is_own_address(host: str, block: ServerBlock) -> bool:
    """Does ``host`` reach this block's sockets? A bound address does; with a wildcard
    every local loopback address of that family does too."""
    address = ip_address(host)
    if address is None:
        return False
    for listening in block.listen_hosts:
        own = ip_address(listening)
        if own is None or own.version != address.version:
            continue
        if own.is_unspecified:
            if address.is_loopback or address.is_unspecified:
                return True
        elif own == address:
            return True
    return False


def static_problem(target: Target, block: ServerBlock) -> str:
    """One line: the target, where it came from, why it loops, and the fix."""
    where = _hostport(target.host, target.port)
    everywhere = "" if block.hosts else f" (it listens on every address of port {target.port})"
    return (
        f"forward target {where}{_from(target)} is this server's own address{everywhere}: "
        f"every query would come back here; {fix(target)}"
    )


def dynamic_explanation(block: ServerBlock, name: str, remote_ip: str, address: str) -> str:
    """Plain words for the FATAL line: which forward target leads back here, and the fix."""
    targets = forward_targets(block, name)
    if not targets:
        return (
            f"The probe for {name} came back to this server ({address}) but this block forwards "
            "nowhere: look for a plugin or upstream that sends queries back here."
        )
    remote = ip_address(remote_ip)
    suspects = [target for target in targets if remote is not None and ip_address(target.host) == remote] or targets
    listed = ", ".join(f"{_hostport(t.host, t.port)}{_from(t)}" for t in suspects)
    which = f"forward target {listed} leads" if len(suspects) == 1 else f"one of the forward targets {listed} leads"
    return (
        f"This server ({address}) forwards queries to itself: {which} back to it, directly or through "
        f"a server that forwards here, so every query would go round until it times out. "
        f"Fix: {fix(*suspects)}."
    )


def fix(*targets: Target) -> str:
    advice = "forward to the real upstream DNS server instead of a loopback address or a server that forwards here"
    if any("nameserver" in (target.source or "") for target in targets):
        advice += (
            ", or use a resolv.conf without the loopback nameserver (with systemd-resolved: "
            "/run/systemd/resolve/resolv.conf; for pods, kubelet's --resolv-conf or resolvConf)"
        )
    return advice


def _from(target: Target) -> str:
    """`` (where it came from)``, unless the source is just the address again."""
    source = (target.source or "").removeprefix("dns://")
    if source in ("", target.host, f"[{target.host}]", _hostport(target.host, target.port)):
        return ""
    return f" ({target.source})"


def _transport(target: Target) -> str:
    return (getattr(target, "transport", "") or "").lower().rstrip(":/")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quote(text: str) -> str:
    """Go's %q for the plain zone names this sees."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
