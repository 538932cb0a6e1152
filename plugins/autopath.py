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
Only class IN queries walk (search paths are an IN matter; zone transfers never walk).

Caching (DESIGN.md failures #3 and #4): with a per-client search path (``@PLUGIN``) the
answer to a name in a namespace's search domain depends on who asks: a pod of that
namespace gets the walk's answer, anyone else the name's own. So:

* a walk's reply that is not the asked name's own answer (a CNAME to another name, or the
  NXDOMAIN every try gave) is marked ``Reply.client_specific``: the cache keeps it for
  that client address only. Its TTLs are cut to the provider's TTL (kubernetes ``ttl``),
  because the address may soon belong to another pod with another search path;
* the NXDOMAIN of a name some pod's walk could expand (``NAME.NAMESPACE.svc.ZONE``) given
  to a client that did not walk is not cacheable at all: shared, it would hide the walk
  from the pods of that namespace; per client, it would make the cache keep state for
  every name any client ever asks (a random-name flood would grow it without bound).

With a resolv.conf every client walks the same path, so answers depend on the question
only and stay shared, with their own TTLs.

Visibility (failure #5): a walk sets the request metadata ``autopath/name`` (the name whose
answer the client got) and ``autopath/search`` (the search path walked), and a client the
provider knows sets ``pod`` (its namespace); ``log`` prints them as ``{/autopath/name}``,
``{/autopath/search}`` and ``{/pod}`` (json: ``pod``). The answers metric counts which
search domain answered: ``corefile_resolver_autopath_answers_total{server,search}``.

Metrics: CoreDNS's ``coredns_autopath_success_total{server}`` (walks that found an answer,
the asked name itself included, as CoreDNS counts them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from dnslib import CNAME, QTYPE, RR, DNSError, DNSLabel, DNSQuestion, DNSRecord

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
Labels = tuple[bytes, ...]
#: The domains a walk tries, in order: (as given, as wire labels).
Walk = list[tuple[str, Labels]]

CLASS_IN = 1
#: Query types that never walk: a zone transfer is of the zone asked, nothing else.
NO_WALK_TYPES = frozenset((QTYPE.AXFR, QTYPE.IXFR))
#: ``search`` label values that are not a search domain.
FIRST = "first"  # the name as the client asked it (its first search domain)
BARE = "."  # the name with no search domain at all
NONE = "none"  # every try was NXDOMAIN
ERROR = "error"  # the walk ended on a failure (SERVFAIL, an unusable reply)
#: At most this many search domains are tried (kubelet's 3 cluster domains and the 6 a
#: resolv.conf could hold in glibc before 2.26): each is one more lookup per query.
MAX_DOMAINS = 9
#: TTL cap of client-specific replies when the provider states none (kubernetes' default).
DEFAULT_CLIENT_TTL = 5


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
        #: The walk of ``search``, worked out once (resolv.conf mode).
        self._path = _walk_path(search) if search else None
        #: The plugin named by ``@PLUGIN``, found in ``connect``.
        self.source = source
        self.search_func: SearchFunc | None = None
        #: Does the answer depend on the client (``@PLUGIN``), so replies must be marked?
        self.per_client = source is not None
        #: Longest TTL of a client-specific reply (``@PLUGIN``): the provider's TTL.
        self.client_ttl = DEFAULT_CLIENT_TTL
        #: "svc.ZONE" of each provider zone, as labels: names some client's walk may
        #: expand end in one of them (see ``_expandable``); None: any name may be.
        self._expandable_suffixes: tuple[Labels, ...] | None = None
        self._directive = directive
        metrics = block.runtime.metrics
        self.successes = metrics.counter(
            "coredns_autopath_success_total", "Counter of requests that did autopath.", ("server",)
        )
        self.answers = metrics.counter(
            "corefile_resolver_autopath_answers_total",
            "Autopath walks by the search domain whose answer the client got "
            '("first": the name as asked, ".": the bare name, "none": every try was NXDOMAIN, '
            '"error": the walk ended on a failure).',
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
        if len(search) > MAX_DOMAINS:
            log.warning(
                "%s has %d search domains: autopath tries the first %d (and then not the bare name)",
                resolv,
                len(search),
                MAX_DOMAINS,
            )
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
        ttl = getattr(settings, "ttl", None)
        if isinstance(ttl, int) and ttl >= 0:
            self.client_ttl = ttl
        zones = getattr(settings, "zones", None)
        if zones:
            # The provider's search paths start with "<namespace>.svc.<zone>": only names
            # below some "svc.<zone>" can be expanded for anyone.
            self._expandable_suffixes = tuple((b"svc", *_domain_labels(zone)) for zone in zones)
        host = getattr(found, "search", None)
        if isinstance(host, list) and len(host) + 3 > MAX_DOMAINS:
            log.warning(
                "the host resolv.conf has %d search domains: autopath tries the cluster's 3 and the first %d",
                len(host),
                MAX_DOMAINS - 3,
            )

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        qname = req.qname
        if req.qclass != CLASS_IN or req.qtype in NO_WALK_TYPES or not in_zones(qname, self.zones):
            # Not a walk for anyone, so the same answer for everyone.
            return await next(req)
        path = self._path
        if self.search_func is not None:
            search = self.search_func(req)
            path = _walk_path(search) if search else None
            if path:
                self._note_pod(req, path[0][1])
        base = _base_labels(req, qname, path[0][0]) if path else None
        if base is None or path is None:
            reply = await next(req)
            if self.per_client and reply is not None and _rcode(reply) == wire.NXDOMAIN and self._expandable(req):
                # A pod of this name's namespace would get the walk's answer instead: a
                # shared NXDOMAIN would hide it from them, so no cache may keep this one.
                return _uncacheable(reply)
            return reply
        return await self._walk(req, next, base, path)

    async def _walk(self, req: Request, next: Handler, base: Labels, path: Walk) -> Reply | None:
        """Try the typed name with each search domain, then bare; first non-NXDOMAIN wins."""
        req.metadata["autopath/search"] = lambda: " ".join(domain or BARE for domain, _labels in path)
        first: Reply | None = None
        for index, (domain, labels) in enumerate(path):
            # The first try is the query as asked: the client's own bytes, case and all.
            tried = req if index == 0 else _expanded(req, base, labels)
            if tried is None:
                continue  # no such name can exist (too long, an empty label): nothing to ask
            reply = await next(tried)
            if reply is None:
                # A plugin dropped this try (acl drop): the client would get nothing for
                # it either, so it gets nothing now; a later try's answer would be one
                # its own resolver could never have reached.
                return None
            if index == 0:
                first = reply
            rcode = _rcode(reply)
            if reply.error is None and rcode == wire.NXDOMAIN:
                continue
            # Found, or failed: an error ends the walk, as in CoreDNS.
            if index > 0:
                reply = self._as_asked(req, reply)
            failed = reply.error is not None or _rcode(reply) != wire.NOERROR
            self.answers.inc((req.server, ERROR if failed else FIRST if index == 0 else domain or BARE))
            if not failed:
                self.successes.inc((req.server,))
                req.metadata["autopath/name"] = tried.qname
            return reply  # the asked name's own answer (index 0) is the same for every client
        self.answers.inc((req.server, NONE))
        if first is None or not self.per_client:
            return first
        return self._for_client(req, first, first.parsed, first.plugin)

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
        if not self.per_client:
            return Reply(message, plugin=self.name, error=reply.error, cacheable=reply.cacheable)
        return self._for_client(req, reply, message, self.name)

    def _for_client(self, req: Request, reply: Reply, message: DNSRecord | None, plugin: str) -> Reply:
        """``reply`` (as ``message``; parsed here when None) marked valid for the asking
        client only, its TTLs cut to the provider's: the client's address may soon be
        another pod's (an IP reused), with another search path, and a cache must not hand
        that pod this one's view for long (DESIGN.md failure #3)."""
        if message is None:
            try:
                message = reply.message
            except (DNSError, ValueError, IndexError) as exc:
                return self.fail(req, wire.SERVFAIL, f"autopath: unparseable reply: {exc}")
        cap = self.client_ttl
        for section in (message.rr, message.auth, message.ar):
            for record in section:
                if record.rtype != QTYPE.OPT and record.ttl > cap:  # OPT's TTL holds flags
                    record.ttl = cap
        return Reply(
            message,
            plugin=plugin,
            error=reply.error,
            client_specific=True,
            cacheable=reply.cacheable,
        )

    def _expandable(self, req: Request) -> bool:
        """Could a walk expand the query name for some client: is it NAME.NAMESPACE.svc.ZONE?
        Compared on labels, so an escaped dot (``a\\.b.svc.cluster.local``) is no boundary."""
        suffixes = self._expandable_suffixes
        if suffixes is None:
            return True  # a provider we know nothing about: any name may be
        labels = tuple(label.lower() for label in req.labels)
        for suffix in suffixes:
            # At least a namespace and one label before "svc.<zone>".
            if len(labels) >= len(suffix) + 2 and labels[len(labels) - len(suffix) :] == suffix:
                return True
        return False

    def _note_pod(self, req: Request, first: Labels) -> None:
        """Put the client's namespace in the metadata (``pod``) for ``log``, when the
        provider's first search domain is "<namespace>.svc.<zone>" (kubernetes)."""
        suffixes = self._expandable_suffixes
        if suffixes is None:
            return
        for suffix in suffixes:
            if len(first) == len(suffix) + 1 and first[1:] == suffix:
                req.metadata["pod"] = first[0].decode("ascii", "replace")
                return


# -- names -----------------------------------------------------------------------------------


def _domain_labels(domain: str) -> Labels:
    """A search domain ("ns.svc.cluster.local.", "" for the bare name) as wire labels."""
    text = domain.rstrip(".")
    return tuple(label.encode("ascii", "replace") for label in text.split(".")) if text else ()


def _walk_path(search: Sequence[str]) -> Walk:
    """The domains a walk tries, in order, each once (compared on labels: ``.`` and the
    bare-name sentinel are one name), at most ``MAX_DOMAINS`` of them. A longer path
    stops there and leaves out the bare name too: it would be tried before domains the
    client tries first, and could answer in their place."""
    seen: set[Labels] = set()
    path: Walk = []
    domains = 0
    for domain in search:
        labels = _domain_labels(domain)
        key = tuple(label.lower() for label in labels)
        if key in seen:
            continue
        if labels:
            if domains == MAX_DOMAINS:
                break
            domains += 1
        seen.add(key)
        path.append((domain, labels))
    return path


def _base_labels(req: Request, qname: str, first: str) -> Labels | None:
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


def _expanded(req: Request, base: Labels, domain: Labels) -> Request | None:
    """A copy of ``req`` asking for BASE.DOMAIN: same header, type, class and EDNS; the
    metadata is shared so what later plugins note (the client's pod) reaches the log.
    None when no such name can exist (longer than DNS allows, or an empty label)."""
    labels = base + domain
    if any(not 0 < len(label) <= 63 for label in labels):
        return None
    name = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
    if len(name) > wire.MAX_NAME_LENGTH:
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


def _uncacheable(reply: Reply) -> Reply:
    """The same reply, which no cache may keep."""
    if not reply.cacheable:
        return reply
    return Reply(
        reply.parsed,
        wire=reply.packed,
        plugin=reply.plugin,
        error=reply.error,
        client_specific=reply.client_specific,
        cacheable=False,
    )


# -- resolv.conf -----------------------------------------------------------------------------


def read_search_path(path_text: str, directive: Directive) -> list[str]:
    """The search domains of a resolv.conf style file named in the Corefile; a word that
    is no domain name is a Corefile error naming the file and line."""
    path = _resolve_path(path_text, directive.file)
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise directive.error(f'failed to parse "{path_text}": {exc.strerror or exc}') from None

    def bad(number: int, word: str) -> None:
        raise CorefileError(directive.file, directive.line, f'autopath: {path} line {number}: bad domain "{word}"')

    return parse_search_path(lines, bad)


def parse_search_path(lines: Iterable[str], bad: Callable[[int, str], None]) -> list[str]:
    """The search domains of resolv.conf lines, as glibc (and CoreDNS) read them: the last
    ``search`` or ``domain`` line wins, and ``domain`` gives one domain. Lower case, final
    dot, each once. ``bad(line number, word)`` hears of a word that is no domain name: it
    raises to refuse the file, or returns to leave the word out (kubernetes reads the
    host's resolv.conf that way: a bad line there is no fault of the Corefile)."""
    domains: list[str] = []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0] not in ("search", "domain"):
            continue
        found = words[1:] if words[0] == "search" else words[1:2]
        domains = []
        for word in found:
            name = _search_domain(word)
            if name is None:
                bad(number, word)
            else:
                domains.append(name)
    return list(dict.fromkeys(domains))


def _search_domain(word: str) -> str | None:
    """``word`` as a domain (lower case, final dot), or None when it cannot be one."""
    name = word.lower().rstrip(".") + "."
    labels = name[:-1].split(".")
    if name != "." and (len(name) > 254 or any(not label or len(label) > 63 for label in labels)):
        return None
    return name


def _resolve_path(path: str, corefile: str) -> str:
    """FILE as given when absolute, else next to the Corefile that names it."""
    if os.path.isabs(path):
        return path
    base = Path.cwd() if corefile in ("", "stdin") else Path(corefile).resolve().parent
    return str(base / path)
