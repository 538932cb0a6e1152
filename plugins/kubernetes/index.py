"""The in-memory view of the cluster that queries are answered from.

A source (the API watch in ``api.py``, or the manifests directory in ``manifests.py``)
feeds raw objects through ``begin_list`` / ``apply`` / ``end_list`` / ``mark_synced``;
the index keeps only what DNS needs (``objects.py``) in dicts keyed the way queries
look things up: a Service by (namespace, name), EndpointSlices by their Service, and
Services, endpoints and Running pods by IP (PTR, autopath, verified pods).

Everything runs on the event loop: an ``apply`` is a few dict operations and never
awaits, so a query never sees a half-applied object. Filters from the Corefile
(``namespaces``, ``labels``, ``namespace_labels``, ``pods local NODE``) are applied here
as well as by the API server's selectors, so every source gives the same answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from plugins.kubernetes import objects
from plugins.kubernetes.objects import Service, Slice
from plugins.kubernetes.settings import Settings
from resolver.logs import plugin_logger

log = plugin_logger("kubernetes")

KINDS = ("Namespace", "Service", "EndpointSlice", "Pod")
EVENTS = ("ADDED", "MODIFIED", "DELETED")

#: Malformed objects logged per kind before the index goes quiet for a while.
_LOG_BURST = 5
_LOG_WINDOW = 60.0

Key = tuple[str, str]  # (namespace, name)
DNS_SERVICE: Key = ("kube-system", "kube-dns")
#: Called with (service_kind, seconds) for each EndpointSlice change after the first sync.
ProgrammingObserver = Callable[[str, float], None]


class Index:
    """Compact indexes of Namespaces, Services, EndpointSlices and Running Pods."""

    def __init__(self, settings: Settings | None = None, on_programming: ProgrammingObserver | None = None) -> None:
        self.settings = settings
        self.on_programming = on_programming
        self.synced = False
        #: Unix time of the last change (the SOA serial, as CoreDNS's "modified").
        self.modified = int(time.time())
        self.services: dict[Key, Service] = {}
        #: kube-system/kube-dns, kept whatever the filters say: ns.dns.<zone> is its address.
        #: It is in ``services`` (answered by name and PTR) only when the filters want it.
        self.dns_service: Service | None = None
        # IP -> the Service (PTR), or a tuple of them when several hold it (an IP reused
        # while its old Service is still being deleted).
        self.service_ips: dict[str, Service | tuple[Service, ...]] = {}
        self.slices: dict[Key, Slice] = {}  # (namespace, slice name) -> Slice
        self.service_slices: dict[Key, tuple[Slice, ...]] = {}  # (namespace, service) -> its slices
        # Endpoint IP -> the slice holding it, or a tuple of them: a pod behind several
        # Services, or an endpoint moving between slices, is in several at once (PTR).
        self.endpoint_ips: dict[str, Slice | tuple[Slice, ...]] = {}
        self.namespaces: set[str] = set()
        # Running pods only. "namespace/name" -> its IP, or a tuple of IPs (dual stack);
        # IP -> "namespace/name", or a tuple of them when pods share it (host network).
        self.pods: dict[str, str | tuple[str, ...]] = {}
        self.pod_ips: dict[str, str | tuple[str, ...]] = {}
        # Keys of the held pods on the host network: their IP is their node's, so it never
        # tells which pod sent a query (autopath), though it still verifies pod names.
        self.host_network_pods: set[str] = set()
        self._listing: dict[str, set[Any]] = {}  # kind -> keys applied since begin_list
        self._logged: dict[str, tuple[float, int]] = {}  # kind -> (window start, lines logged)
        self._appliers: dict[str, Callable[[str, Any], Any]] = {
            "Namespace": self._apply_namespace,
            "Service": self._apply_service,
            "EndpointSlice": self._apply_slice,
            "Pod": self._apply_pod,
        }

    # -- the source interface --------------------------------------------------------------

    def begin_list(self, kind: str) -> None:
        """A full list of ``kind`` starts (initial list, or relist after 410/reconnect)."""
        self._listing[kind] = set()

    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        """Apply one ADDED/MODIFIED/DELETED object; a malformed one is logged and ignored."""
        applier = self._appliers.get(kind)
        if applier is None or event not in EVENTS:
            self._complain(kind, f"ignored {event} event of kind {kind}")
            return
        try:
            # A deletion needs only the object's name: its body is not read (nor trusted).
            key = self._delete(kind, obj) if event == "DELETED" else applier(event, obj)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            self._complain(kind, f"ignored malformed {kind} {_describe(obj)}: {exc}")
            # Whatever was held under this name is stale now (the object changed into
            # something unusable): drop it, as the next relist would, rather than keep
            # answering from the old version until then.
            self._forget(kind, obj)
            return
        self.modified = int(time.time())
        seen = self._listing.get(kind)
        if seen is not None and key is not None and event != "DELETED":
            seen.add(key)

    def end_list(self, kind: str) -> None:
        """Remove the objects of ``kind`` that the list just finished did not name."""
        seen = self._listing.pop(kind, None)
        if seen is None:
            return
        if kind == "Namespace":
            self.namespaces &= seen
        elif kind == "Service":
            for key in [key for key in self.services if key not in seen]:
                self._remove_service(key)
            if DNS_SERVICE not in seen:
                self.dns_service = None
        elif kind == "EndpointSlice":
            for key in [key for key in self.slices if key not in seen]:
                self._remove_slice(key)
        elif kind == "Pod":
            for key in [key for key in self.pods if key not in seen]:
                self._remove_pod(key)

    def mark_synced(self) -> None:
        self.synced = True

    def counts(self) -> dict[str, int]:
        """Objects held per kind (pods: the Running ones kept for client lookups)."""
        return {
            "Namespace": len(self.namespaces),
            "Service": len(self.services),
            "EndpointSlice": len(self.slices),
            "Pod": len(self.pods),
        }

    # -- lookups for answers -----------------------------------------------------------------

    def service(self, namespace: str, name: str) -> Service | None:
        return self.services.get((namespace, name))

    def endpoints(self, service: Service) -> Iterator[objects.Endpoint]:
        """The endpoints DNS serves for ``service``: ready ones, or all of them when the
        Service publishes not-ready addresses."""
        everyone = service.publish_not_ready
        for piece in self.service_slices.get((service.namespace, service.name), ()):
            for endpoint in piece.endpoints:
                if everyone or endpoint.ready:
                    yield endpoint

    def endpoint_groups(self, service: Service) -> Iterator[tuple[objects.Endpoint, tuple[objects.Port, ...]]]:
        """(endpoint, ports) of each served endpoint: ports come from the endpoint's own
        slice, as endpoints in different slices may expose different ports."""
        everyone = service.publish_not_ready
        for piece in self.service_slices.get((service.namespace, service.name), ()):
            for endpoint in piece.endpoints:
                if everyone or endpoint.ready:
                    yield endpoint, piece.ports

    def has_endpoints(self, service: Service) -> bool:
        return next(self.endpoints(service), None) is not None

    def namespace_exists(self, namespace: str) -> bool:
        return namespace in self.namespaces

    def pod_namespaces(self, ip: str) -> list[str]:
        """Namespaces of the Running pods holding ``ip`` (normally one)."""
        found = self.pod_ips.get(ip)
        if found is None:
            return []
        keys = (found,) if isinstance(found, str) else found
        return [key.split("/", 1)[0] for key in keys]

    def client_namespaces(self, ip: str) -> list[str]:
        """Namespaces of the Running pods that may have sent a query from ``ip``: pods on
        the host network are left out (the node and its other such pods share the IP)."""
        found = self.pod_ips.get(ip)
        if found is None:
            return []
        keys = (found,) if isinstance(found, str) else found
        return [key.split("/", 1)[0] for key in keys if key not in self.host_network_pods]

    def services_at(self, ip: str) -> tuple[Service, ...]:
        """The Services whose cluster IPs include ``ip`` (normally one)."""
        return _all(self.service_ips.get(ip))

    def endpoints_at(self, ip: str) -> Iterator[tuple[Slice, objects.Endpoint]]:
        """Every (slice, endpoint) with address ``ip``, in every slice that holds it,
        ready or not (the caller decides what it serves)."""
        for piece in _all(self.endpoint_ips.get(ip)):
            for endpoint in piece.endpoints:
                if endpoint.address == ip:
                    yield piece, endpoint

    # -- appliers: each returns the key the object is held under ----------------------------

    def _apply_namespace(self, event: str, obj: Any) -> str | None:
        name, labels = objects.to_namespace(obj)
        keep = True
        settings = self.settings
        if settings is not None:
            selector = settings.namespace_selector
            keep = settings.namespace_listed(name) and (selector is None or selector.matches(labels))
        if keep:
            self.namespaces.add(name)
        else:
            self.namespaces.discard(name)
            return None  # not held: the relist's end must not count it as seen
        return name

    def _apply_service(self, event: str, obj: Any) -> Key | None:
        service, labels = objects.to_service(obj)
        key = (service.namespace, service.name)
        self._remove_service(key)
        if key == DNS_SERVICE:
            self.dns_service = service  # for ns.dns.<zone> only; served below if wanted
        if not self._wanted(service.namespace, labels):
            return key if key == DNS_SERVICE else None
        self.services[key] = service
        for ip in service.ips:
            _hold(self.service_ips, ip, service)
        return key

    def _apply_slice(self, event: str, obj: Any) -> Key | None:
        pod_names = self.settings is None or self.settings.endpoint_pod_names
        piece, labels, trigger = objects.to_slice(obj, pod_names)
        key = (piece.namespace, piece.name)
        self._remove_slice(key)
        noendpoints = self.settings is not None and self.settings.noendpoints
        if noendpoints or not self._wanted(piece.namespace, labels):
            return None
        self.slices[key] = piece
        owner = (piece.namespace, piece.service)
        self.service_slices[owner] = (*self.service_slices.get(owner, ()), piece)
        for endpoint in piece.endpoints:
            _hold(self.endpoint_ips, endpoint.address, piece)
        self._observe_programming(piece, trigger)
        return key

    def _delete(self, kind: str, obj: Any) -> None:
        """A DELETED event: remove what is held under the object's name."""
        key = _key(kind, obj)
        if kind == "EndpointSlice":
            existed = self._remove_slice(key)
            if existed is not None:
                annotations = objects.metadata(obj)[2].get("annotations")
                trigger = annotations.get(objects.TRIGGER_TIME_ANNOTATION) if isinstance(annotations, dict) else None
                self._observe_programming(existed, trigger if isinstance(trigger, str) else None)
        else:
            self._remove(kind, key)

    def _forget(self, kind: str, obj: Any) -> None:
        """Remove what is held under a malformed object's name, if it has a usable one."""
        try:
            key = _key(kind, obj)
        except (ValueError, TypeError, AttributeError, KeyError):
            return
        self._remove(kind, key)
        self.modified = int(time.time())

    def _remove(self, kind: str, key: Any) -> None:
        if kind == "Namespace":
            self.namespaces.discard(key)
        elif kind == "Service":
            self._remove_service(key)
            if key == DNS_SERVICE:
                self.dns_service = None
        elif kind == "EndpointSlice":
            self._remove_slice(key)
        elif kind == "Pod":
            self._remove_pod(key)

    def _apply_pod(self, event: str, obj: Any) -> str | None:
        namespace, name, ips, running, node, labels = objects.to_pod(obj)
        key = f"{namespace}/{name}"
        settings = self.settings
        wanted = event != "DELETED" and running and bool(ips)
        if settings is not None:
            if not settings.watch_pods or (settings.pods == "local" and node != settings.pods_node):
                wanted = False
            # CoreDNS lists pods with the same `labels` selector as services.
            wanted = wanted and self._wanted(namespace, labels)
        self._remove_pod(key)
        if not wanted:
            return None
        self.pods[key] = ips[0] if len(ips) == 1 else ips
        if objects.host_network(obj):
            self.host_network_pods.add(key)
        for ip in ips:
            held = self.pod_ips.get(ip)
            if held is None:
                self.pod_ips[ip] = key
            else:
                self.pod_ips[ip] = ((held,) if isinstance(held, str) else held) + (key,)
        return key

    # -- removal -------------------------------------------------------------------------------

    def _remove_service(self, key: Key) -> None:
        service = self.services.pop(key, None)
        if service is None:
            return
        for ip in service.ips:
            _release(self.service_ips, ip, service)

    def _remove_slice(self, key: Key) -> Slice | None:
        piece = self.slices.pop(key, None)
        if piece is None:
            return None
        owner = (piece.namespace, piece.service)
        rest = tuple(other for other in self.service_slices.get(owner, ()) if other is not piece)
        if rest:
            self.service_slices[owner] = rest
        else:
            self.service_slices.pop(owner, None)
        # Only this slice's own entries go: other slices holding the same addresses are
        # in those entries too, so a removal costs this slice's endpoints alone.
        for endpoint in piece.endpoints:
            _release(self.endpoint_ips, endpoint.address, piece)
        return piece

    def _remove_pod(self, key: str) -> None:
        self.host_network_pods.discard(key)
        held = self.pods.pop(key, None)
        if held is None:
            return
        for ip in (held,) if isinstance(held, str) else held:
            owners = self.pod_ips.get(ip)
            if owners is None:
                continue
            if isinstance(owners, str):
                if owners == key:
                    del self.pod_ips[ip]
                continue
            rest = tuple(owner for owner in owners if owner != key)
            self.pod_ips[ip] = rest[0] if len(rest) == 1 else rest

    # -- helpers -------------------------------------------------------------------------------

    def _wanted(self, namespace: str, labels: Any) -> bool:
        """Services, EndpointSlices and Pods pass ``namespaces`` and ``labels``."""
        settings = self.settings
        if settings is None:
            return True
        if not settings.namespace_listed(namespace):
            return False
        selector = settings.label_selector
        return selector is None or selector.matches(labels)

    def _observe_programming(self, piece: Slice, trigger: str | None) -> None:
        """DNS programming latency: from the endpoints controller's trigger time to now.
        Only for changes after the first sync (the initial list says nothing about it)."""
        if not self.synced or self.on_programming is None or not trigger or "EndpointSlice" in self._listing:
            return
        service = self.services.get((piece.namespace, piece.service))
        if service is None or service.kind == objects.EXTERNAL_NAME:
            return
        try:
            when = datetime.fromisoformat(trigger.replace("Z", "+00:00")).timestamp()
        except ValueError:
            self._complain("EndpointSlice", f"invalid {objects.TRIGGER_TIME_ANNOTATION} {trigger!r} on {piece.name}")
            return
        kind = "headless_with_selector" if service.headless else "cluster_ip"
        self.on_programming(kind, max(0.0, time.time() - when))

    def _complain(self, kind: str, message: str) -> None:
        """Log bad input, at most a few lines per kind per minute: a broken controller
        writing thousands of bad objects must not flood the log."""
        now = time.monotonic()
        start, count = self._logged.get(kind, (now, 0))
        if now - start > _LOG_WINDOW:
            start, count = now, 0
        if count < _LOG_BURST:
            log.warning("%s", message)
        elif count == _LOG_BURST:
            log.warning("more malformed %s objects; not logging them for a minute", kind)
        self._logged[kind] = (start, count + 1)


def _key(kind: str, obj: Any) -> Any:
    """The key an object of ``kind`` is held under, from its metadata alone."""
    namespace, name, _meta = objects.metadata(obj)
    if kind == "Namespace":
        return name
    if kind == "Pod":
        return f"{namespace}/{name}"
    return (namespace, name)


def _all(held: Any) -> tuple[Any, ...]:
    """The values of a one-or-tuple table entry (see ``_hold``)."""
    if held is None:
        return ()
    return held if isinstance(held, tuple) else (held,)


def _hold(table: dict[str, Any], ip: str, value: Any) -> None:
    """Add ``value`` to the entry of ``ip``: the value itself while it is alone (the
    common case: no tuple per address), a tuple once several objects hold the address."""
    held = table.get(ip)
    if held is None:
        table[ip] = value
    elif isinstance(held, tuple):
        if not any(item is value for item in held):
            table[ip] = (*held, value)
    elif held is not value:
        table[ip] = (held, value)


def _release(table: dict[str, Any], ip: str, value: Any) -> None:
    """Take ``value`` out of the entry of ``ip``; the others holding it stay."""
    held = table.get(ip)
    if held is None:
        return
    if not isinstance(held, tuple):
        if held is value:
            del table[ip]
        return
    rest = tuple(item for item in held if item is not value)
    table[ip] = rest[0] if len(rest) == 1 else rest


def _describe(obj: Any) -> str:
    """namespace/name of a raw object when it has them, for log lines."""
    try:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", "?"))[:100]
        namespace = meta.get("namespace")
        return f"{str(namespace)[:100]}/{name}" if namespace else name
    except AttributeError:
        return "(not an object)"
