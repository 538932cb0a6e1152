"""The few fields of Kubernetes objects that DNS needs, in compact form.

A raw Service as the API returns it is a few kilobytes of nested dicts; what DNS answers
from it fits in a slots object of a handful of (mostly shared, interned) strings. The
converters here read the raw object (camelCase keys, as JSON decodes it and as YAML
manifests hold it) and keep only that, so the scale target (10k Services, 10k
EndpointSlices, 50k Pods) costs megabytes, not hundreds of them. Each converter raises
``ValueError`` (one line) for an object it cannot use; the index logs and skips it.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping
from typing import Any

CLUSTER_IP = "ClusterIP"
HEADLESS = "Headless"
EXTERNAL_NAME = "ExternalName"

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

intern = sys.intern

#: What may stand in one label of an answer's name (Kubernetes' DNS-1123 labels, and
#: underscores): a name outside it could not be packed into a reply.
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")

#: A port: (name, protocol, number); name "" when unnamed, protocol "TCP"/"UDP"/"SCTP".
Port = tuple[str, str, int]


class Service:
    """A Service as DNS sees it."""

    __slots__ = ("external_name", "ips", "kind", "name", "namespace", "ports", "publish_not_ready")

    def __init__(
        self,
        namespace: str,
        name: str,
        kind: str,
        ips: tuple[str, ...] = (),
        ports: tuple[Port, ...] = (),
        external_name: str = "",
        publish_not_ready: bool = False,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.kind = kind  # CLUSTER_IP, HEADLESS or EXTERNAL_NAME
        self.ips = ips  # cluster IPs (normalized text); empty for headless and ExternalName
        self.ports = ports
        self.external_name = external_name  # lower case, final dot
        self.publish_not_ready = publish_not_ready

    @property
    def headless(self) -> bool:
        return self.kind == HEADLESS

    def __repr__(self) -> str:
        return f"<Service {self.namespace}/{self.name} {self.kind} {self.ips or self.external_name}>"


class Endpoint:
    """One address of an EndpointSlice endpoint, and what names it (an endpoint with two
    addresses becomes two of these, as CoreDNS's EndpointAddress: one object and no tuple
    per address keeps 30k endpoints small)."""

    __slots__ = ("address", "hostname", "pod", "ready")

    def __init__(self, address: str, hostname: str, pod: str, ready: bool) -> None:
        self.address = address
        self.hostname = hostname  # "" when unset
        self.pod = pod  # targetRef name; "" when unset, too long for a label, or not needed
        self.ready = ready

    @property
    def addresses(self) -> tuple[str, ...]:
        """The address as a one-element tuple (the EndpointSlice endpoint's shape)."""
        return (self.address,)

    def __repr__(self) -> str:
        return f"<Endpoint {self.address} {self.hostname or self.pod} ready={self.ready}>"


class Slice:
    """An EndpointSlice: which service it belongs to, its endpoints and ports."""

    __slots__ = ("endpoints", "name", "namespace", "ports", "service")

    def __init__(
        self, namespace: str, name: str, service: str, endpoints: tuple[Endpoint, ...], ports: tuple[Port, ...]
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.service = service
        self.endpoints = endpoints
        self.ports = ports

    def __repr__(self) -> str:
        return f"<Slice {self.namespace}/{self.name} of {self.service}: {len(self.endpoints)} endpoints>"


# -- readers of raw objects -------------------------------------------------------------------


def metadata(obj: Any) -> tuple[str, str, Mapping[str, Any]]:
    """(namespace, name, metadata) of a raw object; ValueError when it has no name."""
    if not isinstance(obj, Mapping):
        raise ValueError("not an object")
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise ValueError("no metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("no metadata.name")
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        raise ValueError("metadata.namespace is not a string")
    return dns_label(namespace, "namespace"), name.lower(), meta


def dns_label(text: str, what: str) -> str:
    """``text`` lower-cased and interned if it can be one label of a DNS name."""
    lowered = text.lower()
    if not _LABEL.fullmatch(lowered):
        raise ValueError(f"{what} {text[:80]!r} cannot be a DNS label")
    return intern(lowered)


def _optional_label(text: str) -> str:
    """A name used as a label only when it can be one (else "": the caller falls back)."""
    lowered = text.lower()
    return lowered if _LABEL.fullmatch(lowered) else ""


def labels_of(meta: Mapping[str, Any]) -> Mapping[str, str]:
    labels = meta.get("labels")
    return labels if isinstance(labels, Mapping) else {}


def normal_ip(text: Any) -> str:
    """An IP address in canonical text form (IPv6 compressed); ValueError if not one."""
    if not isinstance(text, str):
        raise ValueError(f"not an IP address: {text!r}")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} is not an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where} is not a list")
    return value


#: Identical port lists shared by every object that has them (most Services have one of a
#: handful: 80/TCP, 443/TCP, 53/UDP+TCP). Bounded: past the limit, lists are kept as built.
_SHARED_PORTS: dict[tuple[Port, ...], tuple[Port, ...]] = {}
_SHARED_PORTS_LIMIT = 4096


def _ports(raw: Any, where: str) -> tuple[Port, ...]:
    ports: list[Port] = []
    for item in _list(raw, where):
        item = _mapping(item, where)
        number = item.get("port")
        if number is None:
            continue  # an EndpointSlice port without a number means "all ports": no SRV
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
            raise ValueError(f"{where}: bad port {number!r}")
        name = item.get("name") or ""
        protocol = item.get("protocol") or "TCP"
        if not isinstance(name, str) or not isinstance(protocol, str):
            raise ValueError(f"{where}: bad port name or protocol")
        ports.append((intern(name.lower()), intern(protocol.upper()), number))
    found = tuple(ports)
    shared = _SHARED_PORTS.get(found)
    if shared is not None:
        return shared
    if len(_SHARED_PORTS) < _SHARED_PORTS_LIMIT:
        _SHARED_PORTS[found] = found
    return found


def to_service(obj: Any) -> tuple[Service, Mapping[str, str]]:
    """The Service and its labels (for the ``labels`` selector)."""
    namespace, name, meta = metadata(obj)
    spec = _mapping(obj.get("spec"), "spec")
    kind = spec.get("type") or CLUSTER_IP
    ports = _ports(spec.get("ports"), "spec.ports")
    publish = bool(spec.get("publishNotReadyAddresses"))
    name = dns_label(name, "service name")  # interned: shared with its slices' label
    if kind == EXTERNAL_NAME:
        target = spec.get("externalName")
        if not isinstance(target, str) or not target.strip("."):
            raise ValueError("ExternalName service without spec.externalName")
        external = target.lower().rstrip(".")
        if not _HOSTNAME.fullmatch(external) or not all(0 < len(part) < 64 for part in external.split(".")):
            raise ValueError(f"spec.externalName {target[:80]!r} is not a host name")
        external += "."
        return Service(namespace, name, EXTERNAL_NAME, (), ports, external, publish), labels_of(meta)
    raw_ips = _list(spec.get("clusterIPs"), "spec.clusterIPs") or [spec.get("clusterIP")]
    if raw_ips[0] == "None":
        return Service(namespace, name, HEADLESS, (), ports, "", publish), labels_of(meta)
    ips = tuple(normal_ip(ip) for ip in raw_ips if ip not in (None, ""))
    return Service(namespace, name, CLUSTER_IP, ips, ports, "", publish), labels_of(meta)


def to_slice(obj: Any, pod_names: bool = True) -> tuple[Slice, Mapping[str, str], str | None]:
    """The EndpointSlice, its labels, and its last-change-trigger-time annotation.
    ``pod_names``: keep each endpoint's pod name (only ``endpoint_pod_names`` uses it)."""
    namespace, name, meta = metadata(obj)
    labels = labels_of(meta)
    service = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not service:
        raise ValueError(f"no {SERVICE_NAME_LABEL} label")
    address_type = obj.get("addressType") or "IPv4"
    endpoints: list[Endpoint] = []
    if address_type in ("IPv4", "IPv6"):  # FQDN slices name no address DNS could serve
        for raw in _list(obj.get("endpoints"), "endpoints"):
            endpoints.extend(_endpoints(_mapping(raw, "endpoints"), pod_names))
    ports = _ports(obj.get("ports"), "ports")
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    trigger = annotations.get(TRIGGER_TIME_ANNOTATION)
    return (
        Slice(namespace, name, dns_label(service, "service name"), tuple(endpoints), ports),
        labels,
        trigger if isinstance(trigger, str) else None,
    )


def _endpoints(raw: Mapping[str, Any], pod_names: bool) -> list[Endpoint]:
    addresses = [normal_ip(address) for address in _list(raw.get("addresses"), "endpoints[].addresses")]
    conditions = _mapping(raw.get("conditions"), "endpoints[].conditions")
    ready = conditions.get("ready")
    hostname = raw.get("hostname") or ""
    target = _mapping(raw.get("targetRef"), "endpoints[].targetRef")
    pod = target.get("name") or ""
    if not isinstance(hostname, str) or not isinstance(pod, str):
        raise ValueError("endpoints[]: hostname or targetRef.name is not a string")
    # A hostname or pod name that cannot be a label is not used (the dashed address
    # names the endpoint instead); CoreDNS drops pod names over 63 characters too.
    hostname = _optional_label(hostname)
    pod = _optional_label(pod) if pod_names else ""
    ready = ready is None or bool(ready)
    return [Endpoint(address, hostname, pod, ready) for address in addresses]


def to_pod(obj: Any) -> tuple[str, str, tuple[str, ...], bool, str, Mapping[str, str]]:
    """(namespace, name, IPs, running, node, labels) of a Pod.

    ``running`` is phase Running and not being deleted: only such a pod may be taken
    as the owner of a client address (a finished pod may still hold a reused IP).
    """
    namespace, name, meta = metadata(obj)
    status = _mapping(obj.get("status"), "status")
    spec = _mapping(obj.get("spec"), "spec")
    ips: list[str] = []
    for item in _list(status.get("podIPs"), "status.podIPs"):
        ip = normal_ip(_mapping(item, "status.podIPs").get("ip"))
        if ip not in ips:
            ips.append(ip)
    if not ips and status.get("podIP"):
        ips.append(normal_ip(status.get("podIP")))
    running = status.get("phase") == "Running" and not meta.get("deletionTimestamp")
    node = spec.get("nodeName") or ""
    return namespace, name, tuple(ips), running, node if isinstance(node, str) else "", labels_of(meta)


def host_network(obj: Any) -> bool:
    """Does the Pod share its node's network (``spec.hostNetwork``)? Its IP is then the
    node's, which the node's own processes and every other such pod send from too."""
    spec = obj.get("spec") if isinstance(obj, Mapping) else None
    return isinstance(spec, Mapping) and spec.get("hostNetwork") is True


def to_namespace(obj: Any) -> tuple[str, Mapping[str, str]]:
    meta = _mapping(obj.get("metadata") if isinstance(obj, Mapping) else None, "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("no metadata.name")
    return dns_label(name, "namespace"), labels_of(meta)
