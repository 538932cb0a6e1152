"""autopath: follow the client's search path on the server, as CoreDNS's autopath does.

Syntax::

    autopath [ZONES...] RESOLV-CONF

RESOLV-CONF is a resolv.conf style file (its last ``search`` or ``domain`` line gives the
search path, the same for every client; a relative path is taken from the Corefile's
directory) or ``@PLUGIN``, a plugin of the same server block that gives each client's
search path (``@kubernetes``: the path of the pod that asks). ZONES default to the server
block's zones; queries outside them go on untouched.

Why: a pod's resolver tries ``db.ns.svc.cluster.local``, ``db.svc.cluster.local``, ...
one round trip at a time, and most of them are NXDOMAIN. When a query's name lies in the
client's *first* search domain, this plugin strips that domain to get the name the client
typed, tries it with each search domain in order and then bare, through the rest of the
chain, and returns the first answer that is not NXDOMAIN. An answer found under another
name gets a CNAME from the asked name to it in front, so the client accepts it. When every
try is NXDOMAIN, the client gets the asked name's own NXDOMAIN (and walks its path itself).

Caching (DESIGN.md failure #4): with a per-client search path (``@PLUGIN``) the answer to
a name in a namespace's search domain depends on who asks: a pod of that namespace gets the
walk's answer, anyone else the name's own. Every reply that differs between the two (the
name's own answer is NXDOMAIN, whether autopath walked or not) is marked
``Reply.client_specific`` so the cache keeps it per client and never hands one client's
answer, nor a shared NXDOMAIN, to a pod that would get another. With a resolv.conf every
client walks the same path, so the answer depends on the question only and stays shared.

Visibility (failure #5): a walk sets the request metadata ``autopath/name`` (the name whose
answer the client got) and ``autopath/search`` (the search path walked), which ``log``
prints with ``{/autopath/name}`` and ``{/autopath/search}``, and counts which search domain
answered in ``corefile_resolver_autopath_answers_total{server,search}``.

Metrics: CoreDNS's ``coredns_autopath_success_total{server}`` (walks that found an answer,
the asked name itself included, as CoreDNS counts them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from dnslib import CNAME, QTYPE, RR, DNSError, DNSLabel, DNSQuestion

from resolver import wire
from resolver.config import ServerBlock, zone_arguments
from resolver.corefile import CorefileError, Directive
from resolver.dnsnames import in_zone, in_zones
from resolver.logs import plugin_logger
from resolver.plugin import Handler, Plugin
from resolver.reply import Reply
from resolver.request import Request

log = plugin_logger("autopath")

SearchFunc = Callable[[Request], "list[str] | None"]

CLASS_IN = 1
#: ``search`` label values that are not a search domain.
FIRST = "first"  # the name as the client asked it (its first search domain)
BARE = "."  # the name with no search domain at all
NONE = "none"  # every try was NXDOMAIN


class AutoPath(Plugin):
    name = "autopath"

    def __init__(
        self,
        zones: list[str],
        search: list[str] | None,
        source: str | None,
        directive: Directive,
        block: ServerBlock,
    ) -> None:
        self.zones = zones
        #: The resolv.conf search path with the "" sentinel; None with ``@PLUGIN``.
        self.search = search
        #: The plugin named by ``@PLUGIN``, found in ``connect``.
        self.source = source
        self.search_func: SearchFunc | None = None
        #: Does the answer depend on the client (``@PLUGIN``), so replies must be marked?
        self.per_client = source is not None
        #: Which names some client's walk may expand (see ``_expandable``); None: any name.
        self._expandable_suffixes: tuple[str, ...] | None = None
        self._directive = directive
        metrics = block.runtime.metrics
        self.successes = metrics.counter(
            "coredns_autopath_success_total", "Counter of requests that did autopath.", ("server",)
        )
        self.answers = metrics.counter(
            "corefile_resolver_autopath_answers_total",
            "Autopath walks by the search domain whose answer the client got "
            '("first": the name as asked, ".": the bare name, "none": every try was NXDOMAIN).',
            ("server", "search"),
        )

    # -- setup -----------------------------------------------------------------------------

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> AutoPath:
        args = directive.args
        if not args:
            raise directive.error("no resolv-conf specified (a resolv.conf file, or @kubernetes)")
        if directive.block is not None:
            raise directive.error("takes no block")
        resolv = args[-1]
        zones = zone_arguments(args[:-1], directive) or list(block.zones)
        if resolv.startswith("@"):
            if len(resolv) == 1:
                raise directive.error('"@" must name a plugin, as in "@kubernetes"')
            return cls(zones, None, resolv[1:], directive, block)
        search = read_search_path(resolv, directive)
        if not search:
            log.warning("%s has no search domains: autopath passes every query on", resolv)
            return cls(zones, None, None, directive, block)
        return cls(zones, [*search, ""], None, directive, block)

    def connect(self, block: ServerBlock) -> None:
        """Find the plugin that knows each client's search path (``@kubernetes``), and
        make sure it keeps what that needs (kubernetes: watch pods)."""
        if self.source is None:
            return
        found = block.find(self.source)
        if found is None:
            raise self._directive.error(
                f'no "{self.source}" plugin in this server block (autopath @{self.source} takes '
                f"each client's search path from it)"
            )
        search_func = getattr(found, "autopath_search", None)
        if not callable(search_func):
            raise self._directive.error(f'plugin "{self.source}" cannot give search paths (no autopath support)')
        self.search_func = search_func
        settings = getattr(found, "settings", None)
        if settings is not None and hasattr(settings, "watch_pods"):
            # A client's search path comes from its pod: the pods must be watched even
            # with ``pods disabled`` (CoreDNS insists on ``pods verified`` instead).
            settings.watch_pods = True
        zones = getattr(settings, "zones", None)
        if zones:
            # The provider's search paths start with "<namespace>.svc.<zone>": only names
            # below some "svc.<zone>" can be expanded for anyone.
            self._expandable_suffixes = tuple("." + _join("svc", zone) for zone in zones)

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        qname = req.qname
        if not in_zones(qname, self.zones):
            return await next(req)
        search = self.search if self.search_func is None else self.search_func(req)
        base = _base_labels(req, qname, search[0]) if search else None
        if base is None or search is None:
            reply = await next(req)
            if self.per_client and reply is not None and self._expandable(qname) and _rcode(reply) == wire.NXDOMAIN:
                # A pod of this name's namespace would get the walk's answer instead:
                # this NXDOMAIN must not be cached for it (nor for anyone but this client).
                return _client_specific(reply)
            return reply
        return await self._walk(req, next, base, search)

    async def _walk(self, req: Request, next: Handler, base: tuple[bytes, ...], search: Sequence[str]) -> Reply | None:
        """Try the typed name with each search domain, then bare; first non-NXDOMAIN wins."""
        req.metadata["autopath/search"] = lambda: " ".join(domain or "." for domain in search)
        first: Reply | None = None
        for index, domain in enumerate(search):
            # The first try is the query as asked: the client's own bytes, case and all.
            tried = req if index == 0 else _expanded(req, base, domain)
            if tried is None:
                continue  # the expanded name would be longer than DNS allows
            reply = await next(tried)
            if index == 0:
                first = reply
            if reply is None:
                continue  # a plugin dropped it: nothing to return from this try
            if reply.error is None and _rcode(reply) == wire.NXDOMAIN:
                continue
            # Found (or failed: an error stops the walk, as in CoreDNS).
            label = FIRST if index == 0 else domain or BARE
            self.answers.inc((req.server, label))
            if reply.error is None:
                self.successes.inc((req.server,))
                req.metadata["autopath/name"] = tried.qname
            if index == 0:
                return reply  # the asked name answered itself: the same for every client
            return self._as_asked(req, reply)
        self.answers.inc((req.server, NONE))
        if first is None:
            return None
        return _client_specific(first) if self.per_client else first

    def _as_asked(self, req: Request, reply: Reply) -> Reply:
        """The answer found under another name, as an answer to the asked one: a CNAME
        from the asked name to the found one first, and the client's own question."""
        try:
            message = reply.message
        except (DNSError, ValueError, IndexError) as exc:
            return self.fail(req, wire.SERVFAIL, f"autopath: unparseable reply for an expanded name: {exc}")
        asked = DNSLabel(req.labels)
        for record in message.rr:
            if record.rname != asked:  # case-insensitive, as CoreDNS compares
                cname = RR(asked, QTYPE.CNAME, CLASS_IN, record.ttl, CNAME(record.rname))
                message.rr.insert(0, cname)
                break
        message.questions = [DNSQuestion(asked, req.qtype, req.qclass)]
        return Reply(
            message,
            plugin=self.name,
            error=reply.error,
            client_specific=self.per_client or reply.client_specific,
            cacheable=reply.cacheable,
        )

    def _expandable(self, qname: str) -> bool:
        """Could a walk expand ``qname`` for some client: is it BASE.NAMESPACE.svc.ZONE?"""
        suffixes = self._expandable_suffixes
        if suffixes is None:
            return True  # a provider we know nothing about: any name may be
        for suffix in suffixes:
            if qname.endswith(suffix):
                # At least a namespace and one label before "svc.<zone>".
                return "." in qname[: -len(suffix)]
        return False


# -- names -----------------------------------------------------------------------------------


def _join(label: str, zone: str) -> str:
    return f"{label}." if zone == "." else f"{label}.{zone}"


def _domain_labels(domain: str) -> tuple[bytes, ...]:
    """A search domain ("ns.svc.cluster.local.", "" for the bare name) as wire labels."""
    text = domain.rstrip(".")
    return tuple(label.encode("ascii", "replace") for label in text.split(".")) if text else ()


def _base_labels(req: Request, qname: str, first: str) -> tuple[bytes, ...] | None:
    """The name the client typed: the query name without the first search domain, or
    None when the name is not strictly below that domain (no walk then). The domain
    itself goes on untouched (CoreDNS answers it SERVFAIL: it has no name to expand)."""
    if qname == first or not in_zone(qname, first):
        return None
    labels = req.labels
    count = len(_domain_labels(first))
    if len(labels) <= count:
        return None
    return labels[: len(labels) - count]


def _expanded(req: Request, base: tuple[bytes, ...], domain: str) -> Request | None:
    """A copy of ``req`` asking for BASE.DOMAIN: same header, type, class and EDNS; the
    metadata is shared so what later plugins note (the client's pod) reaches the log."""
    labels = base + _domain_labels(domain)
    name = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
    if len(name) > wire.MAX_NAME_LENGTH or any(len(label) > 63 for label in labels):
        return None
    query = req.wire
    start = req.question.end - 4  # QTYPE and QCLASS follow the name
    data = query[: wire.HEADER_SIZE] + name + query[start:]
    question = req.question._replace(end=wire.HEADER_SIZE + len(name) + 4)
    tried = Request(data, question, req.client, req.transport, req.server, req.zone)
    tried.metadata = req.metadata
    return tried


# -- replies ---------------------------------------------------------------------------------


def _rcode(reply: Reply) -> int:
    try:
        return reply.rcode
    except Exception:
        return wire.SERVFAIL  # unpackable: the server answers SERVFAIL for it anyway


def _client_specific(reply: Reply) -> Reply:
    """The same reply, marked as valid for the asking client only."""
    if reply.client_specific:
        return reply
    return Reply(
        reply.parsed,
        wire=reply.packed,
        plugin=reply.plugin,
        error=reply.error,
        client_specific=True,
        cacheable=reply.cacheable,
    )


# -- resolv.conf -----------------------------------------------------------------------------


def read_search_path(path_text: str, directive: Directive) -> list[str]:
    """The search domains of a resolv.conf style file, as glibc (and CoreDNS) read it:
    the last ``search`` or ``domain`` line wins. Lower case, final dot."""
    path = _resolve_path(path_text, directive.file)
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise directive.error(f'failed to parse "{path_text}": {exc.strerror or exc}') from None
    domains: list[str] = []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0] not in ("search", "domain"):
            continue
        found = words[1:] if words[0] == "search" else words[1:2]
        domains = [_search_domain(word, path, number, directive) for word in found]
    return list(dict.fromkeys(domains))


def _search_domain(word: str, path: str, number: int, directive: Directive) -> str:
    name = word.lower().rstrip(".") + "."
    labels = name[:-1].split(".")
    if name != "." and (len(name) > 254 or any(not label or len(label) > 63 for label in labels)):
        raise CorefileError(directive.file, directive.line, f'autopath: {path} line {number}: bad domain "{word}"')
    return name


def _resolve_path(path: str, corefile: str) -> str:
    """FILE as given when absolute, else next to the Corefile that names it."""
    if os.path.isabs(path):
        return path
    base = Path.cwd() if corefile in ("", "stdin") else Path(corefile).resolve().parent
    return str(base / path)
