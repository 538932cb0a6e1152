"""log: one line per query on standard output, in CoreDNS's formats.

Syntax::

    log [NAMES...] [FORMAT] [{
        class success|denial|error|all...
    }]

Without arguments every query is logged in the Common Log Format::

    [INFO] 127.0.0.1:50759 - 29008 "A IN example.org. udp 41 false 4096" NOERROR qr,aa,rd 68 0.000113s

NAMES limits logging to queries for names at or under those zones (default ``.``).
FORMAT is a string of placeholders (``{remote}``, ``{>id}``, ``{/LABEL}`` for metadata,
``{common}``, ``{combined}``, ...; see CoreDNS's log README), or ``json`` for one JSON
object per query. ``class`` keeps only replies of those classes: ``success``, ``denial``
(NXDOMAIN or NODATA), ``error`` (SERVFAIL, REFUSED, no reply, ...), ``all`` (the default).

As in CoreDNS, several ``log`` lines in one block form one ordered list of rules and
a query is handled by the first rule whose NAMES cover it, even when that rule's
classes then reject the reply.
"""

from __future__ import annotations

import functools
import json
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from resolver import wire
from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.dnsnames import class_text, rcode_text, type_text
from resolver.logs import core_logger
from resolver.plugin import Handler, Plugin, expect_args, raise_unknown_option
from resolver.reply import Reply
from resolver.request import UDP, Request

# CoreDNS writes query lines with clog.Info: "[INFO] <line>", without "plugin/log:".
# Children of the core logger get exactly that prefix from resolver.logs' formatter.
log = core_logger().getChild("log")

EMPTY = "-"  # CoreDNS's replacer.EmptyValue

COMMON_FORMAT = (
    '{remote}:{port} - {>id} "{type} {class} {name} {proto} {size} {>do} {>bufsize}" '
    "{rcode} {>rflags} {rsize} {duration}"
)
COMBINED_FORMAT = COMMON_FORMAT + ' "{>opcode}"'
JSON_FORMAT = "json"

CLASSES = ("all", "success", "denial", "error")

# Header flag bits in the order CoreDNS's {>rflags} lists them.
_FLAGS = (
    (wire.QR, "qr"),
    (wire.AA, "aa"),
    (wire.TC, "tc"),
    (wire.RD, "rd"),
    (wire.RA, "ra"),
    (0x0040, "z"),
    (wire.AD, "ad"),
    (wire.CD, "cd"),
)
_FLAG_MASK = sum(bit for bit, _name in _FLAGS)
_flag_texts: dict[int, str] = {}  # at most 256 combinations, filled as they occur


def go_seconds(duration_ns: int) -> str:
    """Seconds as Go's ``strconv.FormatFloat(s, 'f', -1, 64) + "s"``: shortest, no exponent."""
    text = repr(duration_ns / 1e9)
    if "e" in text:  # repr switches to 1e-05 style below 0.0001; Go never does
        text = format(Decimal(text), "f")
    elif text.endswith(".0"):
        text = text[:-2]
    return text + "s"


# -- classifying replies (CoreDNS's response.Typify and response.Classify) -----------------

_YEAR68 = 1 << 31


def typify(req: Request, reply: Reply | None) -> str:
    """The response type CoreDNS's ``response.Typify`` gives, from the reply's raw bytes."""
    if reply is None:
        return "OTHERERROR"
    data = reply.wire
    opcode = (data[2] >> 3) & 0x0F
    if opcode == 5:
        return "UPDATE"
    if opcode == 4 or req.qtype in (251, 252):  # NOTIFY, IXFR, AXFR
        return "META"
    try:
        return _typify_answer(req, data, reply.rcode)
    except (struct.error, wire.WireError, IndexError):
        return "OTHERERROR"  # a malformed reply from upstream must not fail the query here


def _typify_answer(req: Request, data: bytes, rcode: int) -> str:
    _id, _flags, qdcount, ancount, nscount, arcount = wire.HEADER.unpack_from(data)
    if req.do and _any_expired_signature(data, _records(data, qdcount, ancount + nscount + arcount)):
        return "OTHERERROR"
    if ancount and rcode == wire.NOERROR:  # the common case: no walk over the records
        return "NOERROR"
    if ancount and rcode == wire.NXDOMAIN:
        return "OTHERERROR"
    authority = [rtype for rtype, _offset in _records(data, qdcount, ancount + nscount)[ancount:]] if nscount else []
    if rcode == wire.NOERROR and 6 in authority:  # SOA: a NODATA
        return "NODATA"
    if rcode == wire.NXDOMAIN:
        return "NXDOMAIN"
    if rcode in (wire.SERVFAIL, wire.NOTIMP):
        return "SERVERERROR"
    if rcode == wire.NOERROR:
        return "DELEGATION" if 2 in authority else "NOERROR"
    return "OTHERERROR"


def classify(response_type: str) -> str:
    if response_type in ("NOERROR", "DELEGATION"):
        return "success"
    if response_type in ("NXDOMAIN", "NODATA"):
        return "denial"
    return "error"


def _records(data: bytes, qdcount: int, count: int) -> list[tuple[int, int]]:
    """(type, offset of RDATA) of the first ``count`` records after the question."""
    offset = wire.HEADER_SIZE
    for _ in range(qdcount):
        offset = wire.skip_name(data, offset) + 4
    found = []
    for _ in range(count):
        offset = wire.skip_name(data, offset)
        rtype, _class, _ttl, rdlength = wire.RR_FIXED.unpack_from(data, offset)
        found.append((rtype, offset + 10))
        offset += 10 + rdlength
    return found


def _any_expired_signature(data: bytes, records: list[tuple[int, int]]) -> bool:
    """Does any RRSIG lie outside its validity period (miekg's RRSIG.ValidityPeriod)?"""
    now = int(time.time())
    for rtype, rdata in records:
        if rtype != 46:
            continue
        expiration = int.from_bytes(data[rdata + 8 : rdata + 12], "big")
        inception = int.from_bytes(data[rdata + 12 : rdata + 16], "big")
        # Serial-number arithmetic (RFC 4034 3.1.5) with Go's truncating division.
        start = inception + int((inception - now) / _YEAR68) * _YEAR68
        end = expiration + int((expiration - now) / _YEAR68) * _YEAR68
        if not start <= now <= end:
            return True
    return False


# -- placeholders ----------------------------------------------------------------------------

# A field getter sees the request, the reply (None when nothing was sent) and the time
# the rest of the chain took, in nanoseconds.
Getter = Callable[[Request, Reply | None, int], str]


def _remote(req: Request, reply: Reply | None, duration: int) -> str:
    ip = req.remote_ip
    return f"[{ip}]" if ":" in ip else ip


def _local(req: Request, reply: Reply | None, duration: int) -> str:
    # The request knows its listener's label (dns://HOST:PORT), not the packet's
    # destination address: a wildcard listener cannot tell which address was asked.
    host = req.server.removeprefix("dns://").rpartition(":")[0]
    if not host:
        return EMPTY
    return f"[{host}]" if ":" in host else host


def _bufsize(req: Request) -> int:
    return wire.MAX_TCP_MESSAGE if req.transport != UDP else req.udp_size


def _rcode(req: Request, reply: Reply | None, duration: int) -> str:
    return EMPTY if reply is None else rcode_text(reply.rcode)


def _rflags(req: Request, reply: Reply | None, duration: int) -> str:
    if reply is None:
        return EMPTY
    return flags_text(req, reply)


def flags_text(req: Request, reply: Reply) -> str:
    """The reply's header flags as the client gets them (TC included when the UDP reply
    has to be cut), comma separated in CoreDNS's order."""
    data = reply.wire
    if req.transport == UDP and len(data) > req.udp_size:
        data = wire.truncate(data, req.udp_size)
    flags = ((data[2] << 8) | data[3]) & _FLAG_MASK
    text = _flag_texts.get(flags)
    if text is None:
        text = _flag_texts[flags] = ",".join([name for bit, name in _FLAGS if flags & bit])
    return text


def _rsize(req: Request, reply: Reply | None, duration: int) -> str:
    return "0" if reply is None else str(len(reply.wire))


def _response_type(req: Request, reply: Reply | None, duration: int) -> str:
    return typify(req, reply)


def _response_class(req: Request, reply: Reply | None, duration: int) -> str:
    return classify(typify(req, reply))


PLACEHOLDERS: dict[str, Getter] = {
    "{type}": lambda req, reply, duration: type_text(req.qtype),
    "{name}": lambda req, reply, duration: req.qname,
    "{class}": lambda req, reply, duration: class_text(req.qclass),
    "{proto}": lambda req, reply, duration: req.transport,
    "{size}": lambda req, reply, duration: str(len(req.wire)),
    "{remote}": _remote,
    "{port}": lambda req, reply, duration: str(req.remote_port),
    "{local}": _local,
    "{>id}": lambda req, reply, duration: str(req.id),
    "{>opcode}": lambda req, reply, duration: str((req.wire[2] >> 3) & 0x0F),
    "{>do}": lambda req, reply, duration: "true" if req.do else "false",
    "{>bufsize}": lambda req, reply, duration: str(_bufsize(req)),
    "{rcode}": _rcode,
    "{rsize}": _rsize,
    "{duration}": lambda req, reply, duration: go_seconds(duration),
    "{>rflags}": _rflags,
    # CoreDNS offers these as metadata set by the log plugin itself.
    "{/log/type}": _response_type,
    "{/log/class}": _response_class,
}


def _metadata(label: str) -> Getter:
    def value(req: Request, reply: Reply | None, duration: int) -> str:
        found = req.metadata.get(label)
        if callable(found):  # CoreDNS's metadata values are functions
            found = found()
        return EMPTY if found is None else str(found)

    return value


def compile_format(text: str) -> list[str | Getter]:
    """Split a format into literals and getters once, at setup.

    Scanning follows CoreDNS's replacer: find each ``}``, back up to the nearest ``{``
    before it; a known placeholder or ``{/label}`` becomes a getter, anything else
    (``{foo}``, a lone brace) stays literal text.
    """
    text = text.replace("{common}", COMMON_FORMAT).replace("{combined}", COMBINED_FORMAT)
    parts: list[str | Getter] = []

    def literal(piece: str) -> None:
        if not piece:
            return
        if parts and isinstance(parts[-1], str):
            parts[-1] += piece
        else:
            parts.append(piece)

    while (close := text.find("}")) >= 0:
        open_ = text.rfind("{", 0, close)
        label = text[open_ : close + 1]
        getter = PLACEHOLDERS.get(label) if open_ >= 0 else None
        if getter is None and open_ >= 0 and label.startswith("{/"):
            getter = _metadata(label[2:-1])
        if getter is None:
            literal(text[: close + 1])
        else:
            literal(text[:open_])
            parts.append(getter)
        text = text[close + 1 :]
    literal(text)
    return parts


def render_parts(parts: list[str | Getter], req: Request, reply: Reply | None, duration: int) -> str:
    return "".join([part if part.__class__ is str else part(req, reply, duration) for part in parts])  # type: ignore[operator,misc]


def render_json(req: Request, reply: Reply | None, duration: int) -> str:
    """One JSON object per query: our addition for log shippers that parse JSON."""
    now = time.time()
    entry: dict[str, object] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
        "client": req.remote_ip,
        "port": req.remote_port,
        "id": req.id,
        "name": req.qname,
        "type": type_text(req.qtype),
        "class": class_text(req.qclass),
        "proto": req.transport,
        "size": len(req.wire),
        "do": req.do,
        "bufsize": _bufsize(req),
        "rcode": None if reply is None else rcode_text(reply.rcode),
        "rflags": None if reply is None else flags_text(req, reply),
        "rsize": 0 if reply is None else len(reply.wire),
        "duration": duration / 1e9,
    }
    pod = req.metadata.get("pod")
    if callable(pod):
        pod = pod()
    if pod is not None:
        entry["pod"] = pod
    return json.dumps(entry, separators=(",", ":"), default=str)


# -- the plugin ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One NAME of one ``log`` line: which queries, which replies, which format."""

    zone: str  # lower case, final dot
    classes: frozenset[str]
    render: Callable[[Request, Reply | None, int], str]

    def covers(self, name: str) -> bool:
        zone = self.zone
        if zone == "." or name == zone:
            return True
        if not name.endswith(zone) or name[-len(zone) - 1] != ".":
            return False
        # "a\.example.org." ends in "example.org." but its label is "a.example".
        escapes = 0
        position = len(name) - len(zone) - 2
        while position >= 0 and name[position] == "\\":
            escapes += 1
            position -= 1
        return escapes % 2 == 0


class Log(Plugin):
    name = "log"
    repeatable = True

    def __init__(self, rules: list[Rule]) -> None:
        self.own_rules = rules  # this line's rules
        self.rules: tuple[Rule, ...] = tuple(rules)  # the block's rules, on the first instance only
        self.catch_all: Rule | None = None

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Log:
        args = list(expect_args(directive, 0))
        render: Callable[[Request, Reply | None, int], str]
        if args and args[-1] == JSON_FORMAT:
            render = render_json
            args.pop()
        elif args and "{" in args[-1]:
            render = functools.partial(render_parts, compile_format(args.pop()))
        else:
            render = functools.partial(render_parts, compile_format(COMMON_FORMAT))
        classes = _parse_classes(directive)
        zones = [_zone(name, directive) for name in args] or ["."]
        return cls([Rule(zone, classes, render) for zone in zones])

    def connect(self, block: ServerBlock) -> None:
        # CoreDNS keeps all of a block's log lines in one plugin: the first rule whose
        # names match decides. The first instance takes every rule; the others pass through.
        instances = block.find_all(self.name)
        if instances[0] is not self:
            self.rules = ()
            return
        self.rules = tuple(rule for instance in instances for rule in instance.own_rules)  # type: ignore[attr-defined]
        self.catch_all = self.rules[0] if self.rules[0].zone == "." else None

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        rule = self.catch_all or self._rule_for(req)
        if rule is None:
            return await next(req)
        start = time.perf_counter_ns()
        reply = await next(req)
        duration = time.perf_counter_ns() - start
        classes = rule.classes
        if ("all" in classes or classify(typify(req, reply)) in classes) and log.isEnabledFor(logging.INFO):
            log.info(rule.render(req, reply, duration))
        return reply

    def _rule_for(self, req: Request) -> Rule | None:
        if not self.rules:
            return None
        name = req.qname
        for rule in self.rules:
            if rule.covers(name):
                return rule
        return None


def _parse_classes(directive: Directive) -> frozenset[str]:
    classes: set[str] = set()
    for option in directive.children:
        if option.name != "class":
            raise raise_unknown_option(directive, option)
        if option.block:
            raise option.error("takes no block")
        for text in expect_args(option, 1):
            if text not in CLASSES:
                raise option.error(f'invalid class "{text}" (use {", ".join(CLASSES)})')
            classes.add(text)
    return frozenset(classes or {"all"})


def _zone(text: str, directive: Directive) -> str:
    if text == ".":
        return "."
    name = text.lower().rstrip(".") + "."
    if not name[:-1] or any(not label for label in name[:-1].split(".")):
        raise directive.error(f'invalid name "{text}"')
    return name
