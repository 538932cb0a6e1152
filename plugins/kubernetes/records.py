"""Answers from the index, as CoreDNS's kubernetes plugin builds them.

The shape follows CoreDNS so that the same names give the same answers: a query name is
parsed into a request (``[endpoint|_port._proto].service.namespace.svc|pod.zone``), the
request is turned into *items* (an address or an ExternalName target, a port, and the
name the item is known by), and each query type makes its records from the items:

* A/AAAA: addresses of the family; an ExternalName item becomes a CNAME followed by
  the target's records, looked up inside the zone or through this server's own chain.
* SRV: one record per (target, port), weight 100/items, glue in the additional section.
* PTR: service cluster IPs and endpoint IPs of the reverse zones served.
* TXT ``dns-version``, SOA and NS at the apex, ``ns.dns.<zone>`` addresses.

An empty item list is NODATA; ``None`` is a name error (NXDOMAIN, fallthrough, or
SERVFAIL before the first sync). Both carry the zone's SOA in the authority section.
Where CoreDNS's answer for a name depends on the query type (NXDOMAIN for TXT on an
existing namespace or on the zone, NODATA for SOA on any name below the apex, NXDOMAIN
for A on ``dns-version`` and for any type but PTR on a reverse name that has a PTR),
this module answers as for every other type: a name exists or it does not, whatever the
type (a cache must never see the two disagree).
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING, NamedTuple

from dnslib import AAAA, CNAME, NS, PTR, QTYPE, RR, SOA, SRV, TXT, A, DNSLabel, DNSRecord

from plugins.kubernetes.objects import CLUSTER_IP, EXTERNAL_NAME, Endpoint, Service
from resolver import wire
from resolver.dnsnames import in_zone, in_zones
from resolver.logs import plugin_logger
from resolver.reply import Reply
from resolver.request import Request

if TYPE_CHECKING:
    from plugins.kubernetes.plugin import Kubernetes
    from resolver.config import ServerBlock
    from resolver.plugin import Handler

log = plugin_logger("kubernetes")

DNS_SCHEMA_VERSION = "1.1.0"
DNS_VERSION_TTL = 28800
MAX_CNAME_CHAIN = 10  # as CoreDNS: CNAMEs followed inside one answer
MAX_LOOKUP_DEPTH = 4  # nested lookups through the server's own chain (ExternalName)
LOOKUP_TIMEOUT = 5.0
_DEPTH_KEY = "kubernetes/lookup_depth"
CLASS_IN = 1


class Item(NamedTuple):
    """What a name resolves to before it becomes records (CoreDNS's msg.Service)."""

    host: str  # an IP address, or a domain name with final dot (ExternalName target)
    port: int  # -1: none (pods, endpoint slices without ports)
    name: str  # the name the item is known by: SRV target and glue owner


class Parsed(NamedTuple):
    """A query name below the zone, as CoreDNS's parseRequest splits it."""

    kind: str  # "svc", "pod", or "" for the zone, svc.<zone> and pod.<zone>
    namespace: str = ""
    service: str = ""
    endpoint: str = ""
    port: str = ""
    protocol: str = ""


Items = list[Item] | None  # None: the name does not exist


def parse(name: str, zone: str) -> Parsed | None:
    """Split ``name`` (below ``zone``); None when it cannot name anything."""
    base = name[: len(name) - len(zone)] if zone != "." else name
    base = base.rstrip(".")
    if base in ("", "svc", "pod"):
        return Parsed("")
    if "\\" in base:  # an escaped dot or byte: no Kubernetes name looks like that
        return None
    labels = base.split(".")
    kind = labels.pop()
    if kind not in ("svc", "pod"):
        return None
    namespace = labels.pop()
    if not labels:
        return Parsed(kind, namespace)
    service = labels.pop()
    if not labels:
        return Parsed(kind, namespace, service)
    if len(labels) == 1:
        return Parsed(kind, namespace, service, endpoint=labels[0])
    if len(labels) == 2:
        return Parsed(kind, namespace, service, port=_strip(labels[0]), protocol=_strip(labels[1]))
    return None


def _strip(label: str) -> str:
    return label[1:] if label.startswith("_") else label


def endpoint_name(endpoint: Endpoint, pod_names: bool) -> str:
    """The endpoint's label: its hostname, else (endpoint_pod_names) its pod's name, else
    its address with dashes (IPv6 too; a trailing dash gets a 0, as in CoreDNS)."""
    if endpoint.hostname:
        return endpoint.hostname
    if pod_names and endpoint.pod:
        return endpoint.pod
    address = endpoint.address
    if "." in address:
        return address.replace(".", "-")
    dashed = address.replace(":", "-")
    return dashed + "0" if dashed.endswith("-") else dashed


def _family(host: str) -> int:
    """4 or 6 for an address, 0 for a domain name (items hold normalized addresses)."""
    if host.endswith("."):
        return 0
    return 6 if ":" in host else 4


def reverse_address(name: str) -> str | None:
    """The address a full PTR name stands for (``4.3.2.1.in-addr.arpa.``), else None."""
    if name.endswith(".in-addr.arpa."):
        labels = name[: -len(".in-addr.arpa.")].split(".")
        if len(labels) != 4:
            return None
        text = ".".join(reversed(labels))
    elif name.endswith(".ip6.arpa."):
        labels = name[: -len(".ip6.arpa.")].split(".")
        if len(labels) != 32 or any(len(label) != 1 for label in labels):
            return None
        nibbles = "".join(reversed(labels))
        text = ":".join(nibbles[i : i + 4] for i in range(0, 32, 4))
    else:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_reverse(name: str) -> bool:
    return name.endswith(("in-addr.arpa.", "ip6.arpa."))


class Answerer:
    """Builds answers for one plugin instance (its settings, its index)."""

    def __init__(self, plugin: Kubernetes) -> None:
        self.plugin = plugin
        self.settings = plugin.settings
        self.index = plugin.index
        zones = [zone for zone in self.settings.zones if not _is_reverse(zone)]
        self.primary = zones[0] if zones else self.settings.zones[0]

    # -- names to items ---------------------------------------------------------------------

    def records(self, name: str, zone: str) -> Items:
        """CoreDNS's Records: the items a forward name has."""
        parsed = parse(name, zone)
        if parsed is None:
            return None
        if not parsed.kind:
            return []
        if _is_reverse(name) or not self.exposed(parsed.namespace):
            return None
        if parsed.kind == "pod":
            return self.find_pods(parsed, zone)
        return self.find_services(parsed, zone)

    def exposed(self, namespace: str) -> bool:
        """Listed by ``namespaces`` (if given) and existing (matching ``namespace_labels``)."""
        return self.settings.namespace_listed(namespace) and self.index.namespace_exists(namespace)

    def find_pods(self, parsed: Parsed, zone: str) -> Items:
        mode = self.settings.pods
        if mode == "disabled":
            return None
        if not parsed.service:
            return []  # <namespace>.pod.<zone>
        if parsed.endpoint or parsed.port or parsed.protocol:
            return None
        label = parsed.service
        dotted = label.count("-") == 3 and "--" not in label  # IPv4, else IPv6
        text = label.replace("-", "." if dotted else ":")
        try:
            ip = str(ipaddress.ip_address(text))
        except ValueError:
            return None
        item = Item(ip, -1, _join(f"{label}.{parsed.namespace}.pod.", zone))
        if mode in ("insecure", "local"):
            # `pods local` keeps only this node's pods: it cannot verify the others, so
            # it answers pod names as insecure does.
            return [item]
        if parsed.namespace in self.index.pod_namespaces(ip):
            return [item]
        return None

    def find_services(self, parsed: Parsed, zone: str) -> Items:
        if not parsed.service:
            return []  # <namespace>.svc.<zone>
        service = self.index.service(parsed.namespace, parsed.service)
        if service is None:
            return None
        base = _join(f"{service.name}.{service.namespace}.svc.", zone)
        kind = service.kind
        if kind == EXTERNAL_NAME:
            if parsed.endpoint or parsed.port or parsed.protocol:
                return None
            target = service.external_name
            if _looks_like_ip(target):
                return None  # CoreDNS serves only a name as ExternalName
            return [Item(target, -1, base)]
        if kind == CLUSTER_IP and self.settings.ignore_empty_service and not self.index.has_endpoints(service):
            return None
        if kind != CLUSTER_IP or parsed.endpoint:
            return self._endpoint_items(service, parsed, base)
        items: list[Item] = []
        found = False
        for port_name, protocol, number in service.ports or (("", "", -1),):
            if not _port_matches(parsed, port_name, protocol):
                continue
            found = True
            items.extend(Item(ip, number, base) for ip in service.ips)
        return items if found else None

    def _endpoint_items(self, service: Service, parsed: Parsed, base: str) -> Items:
        """Headless services, and ``<endpoint>.<service>`` names of any service."""
        pod_names = self.settings.endpoint_pod_names
        items: list[Item] = []
        for endpoint, ports in self.index.endpoint_groups(service):
            label = endpoint_name(endpoint, pod_names)
            if parsed.endpoint and parsed.endpoint != label:
                continue
            for port_name, protocol, number in ports or (("", "", -1),):
                if _port_matches(parsed, port_name, protocol):
                    items.append(Item(endpoint.address, number, f"{label}.{base}"))
        return items or None

    def services(self, name: str, zone: str, qtype: int) -> Items:
        """CoreDNS's Services: records() plus the special names, by query type."""
        if name == _join("dns-version.", zone):
            if qtype == QTYPE.TXT:
                return [Item(DNS_SCHEMA_VERSION, -1, name)]
            return []
        if name == _join("ns.dns.", zone):
            family = 4 if qtype == QTYPE.A else 6 if qtype == QTYPE.AAAA else 0
            return [Item(ip, -1, name) for ip in self.ns_addresses() if _family(ip) == family]
        if name == zone:
            return []  # the apex exists (SOA, NS)
        if _is_reverse(name):
            # A reverse name exists when it has a PTR; any other type of it is NODATA.
            return None if self.reverse(name, zone) is None else []
        items = self.records(name, zone)
        if items is None:
            return None
        if qtype == QTYPE.TXT:
            return []  # TXT exists only on dns-version
        if qtype == QTYPE.SRV:
            return [item for item in items if _family(item.host)]
        return items

    def ns_addresses(self) -> list[str]:
        """Addresses of ns.dns.<zone>: the cluster IPs of kube-system/kube-dns (whether or
        not the filters serve it by name), else the non-loopback addresses this server
        block is bound to."""
        service = self.index.dns_service
        if service is not None and service.ips:
            return list(service.ips)
        block = self.plugin.block
        addresses = []
        for host in block.hosts if block is not None else ():
            try:
                address = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                continue
            if not address.is_loopback and not address.is_unspecified:
                addresses.append(str(address))
        return addresses

    def reverse(self, name: str, zone: str) -> Items:
        """CoreDNS's Reverse: PTR targets of an IP. A service's cluster IP names that
        service (the first one exposed, if several hold the IP); else every served
        endpoint with that address names itself, in every service it is behind."""
        ip = reverse_address(name)
        if ip is None:
            items = self.records(name, zone)
            return None if items is None else [item for item in items if not _family(item.host)]
        # As CoreDNS: namespaces are checked only when `namespaces` lists them (the index
        # holds no Service nor EndpointSlice that `namespaces` or `labels` exclude).
        restricted = bool(self.settings.namespaces)
        for service in self.index.services_at(ip):
            if not restricted or self.exposed(service.namespace):
                return [Item(_join(f"{service.name}.{service.namespace}.svc.", self.primary), -1, name)]
        pod_names = self.settings.endpoint_pod_names
        items: list[Item] = []
        for piece, endpoint in self.index.endpoints_at(ip):
            if restricted and not self.exposed(piece.namespace):
                continue
            if not endpoint.ready:
                owner = self.index.service(piece.namespace, piece.service)
                if owner is None or not owner.publish_not_ready:
                    continue
            label = endpoint_name(endpoint, pod_names)
            target = _join(f"{label}.{piece.service}.{piece.namespace}.svc.", self.primary)
            items.append(Item(target, -1, name))
        return items or None

    # -- answering ---------------------------------------------------------------------------

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        qname = req.qname
        zone = self.plugin.zone_of(qname)
        if zone is None:
            return await next(req)
        qtype = req.qtype
        # As CoreDNS, the records keep the letter case of the query: the owner is the name
        # as sent, and names made from the zone (SRV targets and their glue, SOA, NS) take
        # the zone as the query spelled it. Lookups use the lower-case ``qname``.
        owner = DNSLabel(req.labels)
        cased = _cased_zone(req.labels, zone)
        answer: list[RR] = []
        extra: list[RR] = []
        items: Items
        if qtype in (QTYPE.A, QTYPE.AAAA):
            records = await self.addresses(req, qname, zone, qtype, [], owner)
            items, answer = ([], records) if records is not None else (None, [])
        elif qtype == QTYPE.SRV:
            items = self.services(qname, zone, qtype)
            if items:
                answer, extra = self.srv(owner, items, zone, cased)
        elif qtype == QTYPE.PTR:
            items = self.reverse(qname, zone)
            if items:
                answer = self.ptr(owner, items)
        elif qtype == QTYPE.TXT:
            items = self.services(qname, zone, qtype)
            if items:
                answer = [self._rr(owner, QTYPE.TXT, TXT(items[0].host), DNS_VERSION_TTL)]
        elif qtype == QTYPE.CNAME:
            items = self.services(qname, zone, qtype)
            if items and not _family(items[0].host):
                answer = [self._rr(owner, QTYPE.CNAME, CNAME(_label(items[0].host)))]
        elif qtype == QTYPE.SOA and qname == zone:
            items, answer = [], [self.soa(cased)]
        elif qtype == QTYPE.NS and qname == zone:
            items = []
            answer, extra = self.ns(cased)
        elif qtype in (QTYPE.AXFR, QTYPE.IXFR):
            return self.plugin.fail(req, wire.REFUSED)
        else:
            # Every other type (MX, SOA and NS below the apex, ...): the name exists or not.
            items = self.services(qname, zone, QTYPE.A)
            items = None if items is None else []

        if items is None:
            fallthrough = self.settings.fallthrough
            if fallthrough is not None and in_zones(qname, fallthrough):
                return await next(req)
            rcode = wire.NXDOMAIN if self.index.synced else wire.SERVFAIL
            return self._negative(req, cased, rcode)
        if not answer:
            return self._negative(req, cased, wire.NOERROR)
        reply = req.reply(authoritative=True)
        for record in answer:
            reply.add_answer(record)
        for record in extra:
            reply.add_ar(record)
        return self.plugin.answer(reply)

    async def addresses(
        self, req: Request, name: str, zone: str, qtype: int, chain: list[RR], owner: DNSLabel | None = None
    ) -> list[RR] | None:
        """A or AAAA records of ``name`` (None: no such name), following ExternalName
        CNAMEs inside the zone, or through the server for targets outside it. ``owner``:
        the records' owner name (the query's own spelling), ``name`` by default."""
        items = self.services(name, zone, qtype)
        rname = _label(name) if owner is None else owner
        if items is None:
            return None
        want = 4 if qtype == QTYPE.A else 6
        records: list[RR] = []
        seen: set[str] = set()
        for item in items:
            family = _family(item.host)
            if family == want and item.host not in seen:
                seen.add(item.host)
                rdata = A(item.host) if want == 4 else AAAA(item.host)
                records.append(self._rr(rname, qtype, rdata))
            elif family == 0:
                records.extend(await self._follow(req, name, rname, item.host, zone, qtype, chain))
        return records

    async def _follow(
        self, req: Request, name: str, rname: DNSLabel, target: str, zone: str, qtype: int, chain: list[RR]
    ) -> list[RR]:
        """The CNAME from ``name`` (spelled ``rname``) to ``target`` and the target's
        records; nothing when they cannot be had (CoreDNS then leaves the CNAME out too)."""
        if target == name or len(chain) > MAX_CNAME_CHAIN:
            return []
        if any(str(record.rname).lower() == name and str(record.rdata.label) == target for record in chain):
            return []  # a CNAME loop
        cname = self._rr(rname, QTYPE.CNAME, CNAME(_label(target)))
        if in_zone(target, zone):
            following = await self.addresses(req, target, zone, qtype, [*chain, cname])
            return [cname, *following] if following else []
        message = await lookup(self.plugin.block, req, target, qtype)
        if message is None:
            return []
        return [cname, *message.rr]

    def srv(self, owner: DNSLabel, items: list[Item], zone: str, cased: str) -> tuple[list[RR], list[RR]]:
        """SRV records with CoreDNS's weights (100 / number of items, at least 1) and
        their targets' addresses as glue; targets end in the zone as the query spelled it."""
        weight = max(1, int(100 / len(items)))
        answer: list[RR] = []
        extra: list[RR] = []
        seen_srv: set[tuple[str, int]] = set()
        seen_glue: set[tuple[str, str]] = set()
        for item in items:
            if item.port == -1:
                continue
            target = _recase(item.name, zone, cased)
            if (target, item.port) not in seen_srv:
                seen_srv.add((target, item.port))
                answer.append(self._rr(owner, QTYPE.SRV, SRV(0, weight, item.port, _label(target))))
            if (target, item.host) not in seen_glue:
                seen_glue.add((target, item.host))
                if _family(item.host) == 4:
                    extra.append(self._rr(target, QTYPE.A, A(item.host)))
                else:
                    extra.append(self._rr(target, QTYPE.AAAA, AAAA(item.host)))
        return answer, extra

    def ptr(self, owner: DNSLabel, items: list[Item]) -> list[RR]:
        """One PTR per distinct target (an endpoint behind several services has several)."""
        targets = list(dict.fromkeys(item.host for item in items))
        return [self._rr(owner, QTYPE.PTR, PTR(_label(target))) for target in targets]

    def ns(self, zone: str) -> tuple[list[RR], list[RR]]:
        """NS ns.dns.<zone>, with its addresses as glue (no addresses: no NS, as CoreDNS)."""
        server = _join("ns.dns.", zone)
        glue = []
        for ip in self.ns_addresses():
            if _family(ip) == 4:
                glue.append(self._rr(server, QTYPE.A, A(ip)))
            else:
                glue.append(self._rr(server, QTYPE.AAAA, AAAA(ip)))
        if not glue:
            return [], []
        return [self._rr(zone, QTYPE.NS, NS(_label(server)))], glue

    def soa(self, zone: str) -> RR:
        """The zone's SOA: TTL min(ttl, 300), minimum ttl, serial the index's last change."""
        ttl = self.settings.ttl
        times = (self.index.modified & 0xFFFFFFFF, 7200, 1800, 86400, ttl)
        rdata = SOA(_label(_join("ns.dns.", zone)), _label(_join("hostmaster.", zone)), times)
        return RR(_label(zone), QTYPE.SOA, CLASS_IN, min(ttl, 300), rdata)

    def _negative(self, req: Request, zone: str, rcode: int) -> Reply:
        reply = req.reply(rcode, authoritative=True)
        reply.add_auth(self.soa(zone))
        return self.plugin.answer(reply)

    def _rr(self, name: str | DNSLabel, rtype: int, rdata: object, ttl: int | None = None) -> RR:
        owner = name if isinstance(name, DNSLabel) else _label(name)
        return RR(owner, rtype, CLASS_IN, self.settings.ttl if ttl is None else ttl, rdata)


def _port_matches(parsed: Parsed, name: str, protocol: str) -> bool:
    return (not parsed.port or parsed.port == name) and (not parsed.protocol or parsed.protocol == protocol.lower())


def _looks_like_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.rstrip("."))
    except ValueError:
        return False
    return True


def _join(prefix: str, zone: str) -> str:
    """``prefix`` (labels with a final dot) under ``zone``: the root adds nothing."""
    return prefix if zone == "." else prefix + zone


def _label(name: str) -> DNSLabel:
    return DNSLabel(name)


def _cased_zone(labels: tuple[bytes, ...], zone: str) -> str:
    """``zone`` spelled with the letter case of the query's last labels (CoreDNS's
    ``qname[len(qname)-len(zone):]``); ``zone`` itself if they do not spell it."""
    count = 0 if zone == "." else zone.count(".")  # configured zones hold no escaped dots
    if count > len(labels):
        return zone
    tail = labels[len(labels) - count :]
    cased = ".".join(label.decode("ascii", "replace") for label in tail) + "." if tail else "."
    return cased if cased.lower() == zone else zone


def _recase(name: str, zone: str, cased: str) -> str:
    """``name`` (lower case, made from ``zone``) ending in the zone as ``cased`` spells it."""
    if cased == zone or not name.endswith(zone):
        return name
    return name[: len(name) - len(zone)] + cased


# -- lookups through the server's own chain ------------------------------------------------


async def lookup(block: ServerBlock | None, req: Request, name: str, qtype: int) -> DNSRecord | None:
    """Ask this server for ``name``/``qtype`` as a client of the same listener would,
    through the chain of the block serving the name (CoreDNS's upstream.Lookup).

    Depth-limited through the request's metadata (an ExternalName whose target is
    another ExternalName elsewhere...), bounded in time, and None on any failure.
    """
    if block is None or block.config is None:
        return None
    depth = int(req.metadata.get(_DEPTH_KEY, 0))
    if depth >= MAX_LOOKUP_DEPTH:
        return None
    target = _route(block, name)
    if target is None:
        return None
    zone, serving = target
    query = DNSRecord.question(name.rstrip(".") or ".", QTYPE.get(qtype, qtype))
    query.header.rd = 1
    data = bytes(query.pack())
    try:
        question = wire.parse_question(data)
    except wire.WireError:
        return None
    inner = Request(data, question, req.client, req.transport, req.server, zone)
    inner.metadata[_DEPTH_KEY] = depth + 1
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT):
            reply = await serving.handler(inner)
    except TimeoutError:
        return None
    except Exception as exc:  # the other chain failed: no target records, as CoreDNS
        log.debug("lookup of %s through the server failed: %r", name, exc)
        return None
    if reply is None or reply.rcode in (wire.SERVFAIL, wire.REFUSED):
        return None
    try:
        return reply.message
    except Exception:
        return None


def _route(block: ServerBlock, name: str) -> tuple[str, ServerBlock] | None:
    """The block (and its zone) a query for ``name`` reaching this block's listener
    would go to: the longest zone among blocks on the same host and port."""
    config = block.config
    if config is None or not block.keys:
        return None
    host = block.listen_hosts[0]
    port = block.keys[0].port
    zones = config.routes().get((host, port), {})
    best: tuple[str, ServerBlock] | None = None
    for zone, other in zones.items():
        if in_zone(name, zone) and (best is None or len(zone) > len(best[0])):
            best = (zone, other)
    return best
