"""hosts: answer A, AAAA and PTR queries from an /etc/hosts style file and inline lines.

Syntax::

    hosts [FILE [ZONES...]] [{
        [INLINE...]                   # /etc/hosts lines: 10.0.0.1 example.org alias
        ttl SECONDS                   # TTL of every record (default 3600, 1 to 65535)
        no_reverse                    # no PTR records for the entries
        reload DURATION               # how often FILE is checked (default 5s, 0 disables)
        fallthrough [ZONES...]        # names not in the hosts data go to the next plugin
        fallthrough_unsupported       # other types (TXT, MX...) go to the next plugin too
    }]

FILE defaults to ``/etc/hosts``; a relative path is taken from the Corefile's directory.
ZONES default to the server block's zones; only names inside them are served (and kept
from the file). Inline lines must come before ``fallthrough``.

Semantics are CoreDNS's ``plugin/hosts``:

* A name in the hosts data gets its addresses (authoritative); when it has no records
  of the asked type, an authoritative NOERROR with an empty answer.
* A name not in the hosts data falls through when ``fallthrough`` covers it, otherwise
  gets SERVFAIL: there is no SOA to build an NXDOMAIN with, as CoreDNS reasons.
* Queries outside ZONES go to the next plugin; so do PTR queries for addresses not in
  the data, whatever ``fallthrough`` says. PTR queries are answered for any known
  address, whether or not the reverse zone is among ZONES.
* ``*.example.com`` as a name matches exactly one label below example.com (no PTR).
* FILE is re-read when its modification time or size changes. When it disappears the
  last good contents keep being served; a missing FILE at startup is a warning only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dnslib import AAAA, PTR, QTYPE, RR, A, DNSLabel

from resolver import wire
from resolver.config import ServerBlock, ip_address, zone_arguments
from resolver.corefile import CorefileError, Directive
from resolver.dnsnames import in_zones
from resolver.logs import plugin_logger
from resolver.metrics import GaugeVec
from resolver.plugin import Handler, Plugin, expect_args, parse_duration
from resolver.reply import Reply
from resolver.request import Request

log = plugin_logger("hosts")

DEFAULT_PATH = "/etc/hosts"
DEFAULT_TTL = 3600
DEFAULT_RELOAD = 5.0
CLASS_IN = 1

_EMPTY: tuple[str, ...] = ()
# Everything up to and including the first dot that is not escaped (name_text escapes
# dots inside labels as "\.").
_FIRST_LABEL = re.compile(r"(?:[^.\\]|\\.)*\.")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_LABEL = re.compile(r"[\x21-\x7e]{1,63}")


@dataclass(slots=True)
class HostsTable:
    """One parsed hosts source (the file, or the Corefile's inline lines).

    Plain dicts keyed by lower-case names with a final dot; a reload builds a new table
    and the plugin swaps one attribute, so a query never sees a half-built table.
    """

    name4: dict[str, list[str]] = field(default_factory=dict)
    name6: dict[str, list[str]] = field(default_factory=dict)
    wild4: dict[str, list[str]] = field(default_factory=dict)  # "*.example.com." -> addresses
    wild6: dict[str, list[str]] = field(default_factory=dict)
    reverse: dict[str, list[str]] = field(default_factory=dict)  # "1.0.0.10.in-addr.arpa." -> names
    #: CoreDNS's count for coredns_hosts_entries: addresses per name plus names per address.
    entries: int = 0

    def v4(self, name: str) -> Sequence[str]:
        return _lookup(self.name4, self.wild4, name)

    def v6(self, name: str) -> Sequence[str]:
        return _lookup(self.name6, self.wild6, name)


def _lookup(names: dict[str, list[str]], wild: dict[str, list[str]], name: str) -> Sequence[str]:
    """Exact name first; else the wildcard one label up, as CoreDNS's lookup does."""
    found = names.get(name)
    if found is not None:
        return found
    if wild:
        first = _FIRST_LABEL.match(name)
        if first is not None and first.end() < len(name):
            return wild.get("*." + name[first.end() :], _EMPTY)
    return _EMPTY


def _normal_name(text: str) -> str | None:
    """A host name as a lookup key (ASCII lower case, final dot), or None if unusable.

    CoreDNS keeps any token; names that cannot be written into a DNS message (empty or
    over-long labels, non-ASCII, backslashes) are dropped here instead, so a bad entry
    can never turn a PTR answer into a packing error.
    """
    name = text.removesuffix(".")
    if not name or len(name) > 253 or "\\" in name:
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return name.lower() + "."


def parse_hosts(lines: Iterable[str], origins: Sequence[str], auto_reverse: bool) -> tuple[HostsTable, list[int]]:
    """Parse hosts-file lines into a table; also return the numbers (1-based) of bad lines.

    A bad line (one field only, or no IP address first) is skipped, as CoreDNS skips it;
    names outside ``origins`` are left out silently. Never raises on any input text.
    """
    table = HostsTable()
    skipped: list[int] = []
    for number, raw in enumerate(lines, 1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        ip = ip_address(fields[0]) if len(fields) >= 2 else None
        if ip is None:
            skipped.append(number)
            continue
        _add(table, ip, fields[1:], origins, auto_reverse)
    return table, skipped


def _add(
    table: HostsTable,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    names: list[str],
    origins: Sequence[str],
    auto_reverse: bool,
) -> None:
    address = str(ip)
    v4 = ip.version == 4
    for text in names:
        name = _normal_name(text)
        if name is None or not in_zones(name, origins):
            continue
        if name.startswith("*."):
            (table.wild4 if v4 else table.wild6).setdefault(name, []).append(address)
            table.entries += 1
            continue
        (table.name4 if v4 else table.name6).setdefault(name, []).append(address)
        table.entries += 1
        if not auto_reverse:
            continue
        reverse = ip.reverse_pointer + "."
        owners = table.reverse.get(reverse)
        if owners is None:
            owners = table.reverse[reverse] = []
            if v4:
                # CoreDNS turns an ip6.arpa name back into an address and prints ::ffff:a.b.c.d
                # as a.b.c.d, so the mapped form finds the IPv4 entry too: share the list.
                mapped = ipaddress.IPv6Address(f"::ffff:{address}").reverse_pointer + "."
                table.reverse[mapped] = owners
        owners.append(name)
        table.entries += 1


class Hosts(Plugin):
    name = "hosts"

    def __init__(
        self,
        path: str,
        origins: list[str],
        inline: HostsTable,
        *,
        ttl: int = DEFAULT_TTL,
        reload: float = DEFAULT_RELOAD,
        auto_reverse: bool = True,
        fall: list[str] | None = None,
        fall_unsupported: bool = False,
        block: ServerBlock | None = None,
    ) -> None:
        self.path = path
        self.origins = origins
        self.inline = inline
        self.file = HostsTable()  # replaced whole on every (re)read
        self.ttl = ttl
        self.reload = reload
        self.auto_reverse = auto_reverse
        self.fall = fall or []  # empty: never fall through
        self.fall_unsupported = fall_unsupported
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the last read
        self._task: asyncio.Task[None] | None = None
        self._entries: GaugeVec | None = None
        self._reloaded: GaugeVec | None = None
        if block is not None:
            metrics = block.runtime.metrics
            self._entries = metrics.gauge(
                "coredns_hosts_entries", "The combined number of entries in hosts and Corefile.", ("hostsfile",)
            )
            self._reloaded = metrics.gauge(
                "coredns_hosts_reload_timestamp_seconds", "The timestamp of the last reload of hosts file."
            )

    # -- setup ------------------------------------------------------------------------------

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Hosts:
        args = list(directive.args)
        path = DEFAULT_PATH
        if args:
            path = _resolve_path(args.pop(0), block.file)
            _check_file(path, directive)
        origins = zone_arguments(args, directive) if args else list(block.zones)

        options: dict[str, object] = {}
        fall: list[str] | None = None
        inline: list[tuple[str, Directive]] = []
        for option in directive.children:
            name = option.name
            if name in ("fallthrough", "fallthrough_unsupported", "no_reverse", "ttl", "reload") and option.block:
                raise option.error("takes no block")
            if name == "fallthrough":
                fall = zone_arguments(option.args, option) if option.args else ["."]
            elif name == "fallthrough_unsupported":
                expect_args(option, 0, 0)
                options["fall_unsupported"] = True
            elif name == "no_reverse":
                expect_args(option, 0, 0)
                options["auto_reverse"] = False
            elif name == "ttl":
                options["ttl"] = _ttl(option)
            elif name == "reload":
                if len(option.args) != 1:
                    raise option.error("needs a duration (zero seconds to disable)")
                options["reload"] = parse_duration(option.args[0], option)
            elif fall is None and not option.block:
                inline.append((" ".join([name, *option.args]), option))
            else:
                raise CorefileError(
                    option.file,
                    option.line,
                    f'{directive.name}: unknown option "{name}" (inline hosts lines go before fallthrough)',
                )
        if options.get("fall_unsupported") and not fall:
            raise directive.error("fallthrough_unsupported requires fallthrough")

        auto_reverse = bool(options.get("auto_reverse", True))
        table, skipped = parse_hosts((text for text, _ in inline), origins, auto_reverse)
        for number in skipped:
            text, option = inline[number - 1]
            log.warning("%s:%d: not a hosts line (want ADDRESS NAME...), ignored: %s", option.file, option.line, text)
        return cls(path, origins, table, fall=fall, block=block, **options)  # type: ignore[arg-type]

    # -- file reading -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        if self._entries is not None and self._stamp is None:
            # The file was not read (missing): still report the inline entries.
            self._entries.set((self.path,), self.inline.entries)
        if self.reload > 0:
            self._task = asyncio.create_task(self._watch(), name=f"hosts {self.path}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload)
            try:
                await self.refresh()
            except Exception:  # never let one bad read end the watch
                log.exception("reading %s failed", self.path)

    async def refresh(self) -> bool:
        """Re-read the file if its mtime or size changed; True when the tables changed.

        Reading and parsing run in a thread (blocklist hosts files are large); the new
        table is swapped in here, on the loop, in one assignment.
        """
        result = await asyncio.to_thread(_read_table, self.path, self._stamp, self.origins, self.auto_reverse)
        if result is None:
            return False
        table, stamp, skipped = result
        self.file = table
        self._stamp = stamp
        if skipped:
            log.warning(
                "%s: skipped %d malformed line%s (first at line %d)",
                self.path,
                len(skipped),
                "" if len(skipped) == 1 else "s",
                skipped[0],
            )
        log.debug("Parsed hosts file into %d entries", table.entries)
        if self._entries is not None and self._reloaded is not None:
            self._entries.set((self.path,), self.inline.entries + table.entries)
            self._reloaded.set((), stamp[0] / 1e9)  # CoreDNS reports the file's mtime
        return True

    # -- serving ----------------------------------------------------------------------------

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        qname = req.qname
        qtype = req.qtype
        file, inline = self.file, self.inline
        if qtype == QTYPE.PTR:
            # PTR needs no zone match; an unknown address always goes on, as in CoreDNS.
            owners = [*file.reverse.get(qname, _EMPTY), *inline.reverse.get(qname, _EMPTY)]
            if not owners:
                return await next(req)
            return self._reply(req, QTYPE.PTR, [PTR(DNSLabel(owner.encode())) for owner in owners])
        if not in_zones(qname, self.origins):
            return await next(req)
        if qtype == QTYPE.A:
            addresses = [*file.v4(qname), *inline.v4(qname)]
            if addresses:
                return self._reply(req, QTYPE.A, [A(address) for address in addresses])
        elif qtype == QTYPE.AAAA:
            addresses = [*file.v6(qname), *inline.v6(qname)]
            if addresses:
                return self._reply(req, QTYPE.AAAA, [AAAA(address) for address in addresses])
        elif self.fall_unsupported and in_zones(qname, self.fall):
            return await next(req)
        if file.v4(qname) or inline.v4(qname) or file.v6(qname) or inline.v6(qname):
            return self._reply(req, qtype, [])  # the name exists: NODATA
        if in_zones(qname, self.fall):
            return await next(req)
        return self.fail(req, wire.SERVFAIL)

    def _reply(self, req: Request, rtype: int, rdatas: list[object]) -> Reply:
        reply = req.reply(authoritative=True)
        if rdatas:
            # CoreDNS answers with the lower-cased query name; build it from the wire labels
            # so a wildcard-matched first label is copied byte for byte.
            owner = DNSLabel(tuple(label.lower() for label in reply.q.qname.label))
            for rdata in rdatas:
                reply.add_answer(RR(owner, rtype, CLASS_IN, self.ttl, rdata))
        return self.answer(reply)


# -- helpers for setup ----------------------------------------------------------------------


def _resolve_path(path: str, corefile: str) -> str:
    """FILE as given when absolute, else next to the Corefile that names it."""
    if os.path.isabs(path):
        return path
    base = Path.cwd() if corefile in ("", "stdin") else Path(corefile).resolve().parent
    return str(base / path)


def _check_file(path: str, directive: Directive) -> None:
    """CoreDNS's setup check: missing is a warning, unreadable an error."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        log.warning("File does not exist: %s", path)
        return
    except OSError as exc:
        raise directive.error(f"unable to access hosts file '{path}': {exc.strerror or exc}") from None
    if stat.S_ISDIR(status.st_mode):
        log.warning('Hosts file "%s" is a directory', path)


def _ttl(option: Directive) -> int:
    if not option.args:
        raise option.error("needs a time in seconds")
    if len(option.args) > 1:
        raise option.error(f"takes one number of seconds, got {' '.join(option.args)!r}")
    if not _INTEGER.fullmatch(option.args[0]):
        raise option.error(f'needs a number of seconds, got "{option.args[0]}"')
    ttl = int(option.args[0])
    if not 0 < ttl <= 65535:
        raise option.error(f"{ttl} is invalid: must be between 1 and 65535")
    return ttl


def _read_table(
    path: str, stamp: tuple[int, int] | None, origins: Sequence[str], auto_reverse: bool
) -> tuple[HostsTable, tuple[int, int], list[int]] | None:
    """Runs in a thread: the new table when the file changed, None when unchanged or unreadable.

    An unreadable or vanished file keeps the previous table, as CoreDNS does.
    """
    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            current = (status.st_mtime_ns, status.st_size)
            if current == stamp:
                return None
            data = handle.read()
    except OSError:
        return None
    table, skipped = parse_hosts(data.decode("utf-8", "replace").splitlines(), origins, auto_reverse)
    return table, current, skipped
