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
        self.service_ips: dict[str, Service] = {}  # cluster IP -> Service (PTR)
        self.slices: dict[Key, Slice] = {}  # (namespace, slice name) -> Slice
        self.service_slices: dict[Key, tuple[Slice, ...]] = {}  # (namespace, service) -> its slices
        self.endpoint_ips: dict[str, Slice] = {}  # endpoint IP -> a slice holding it (PTR)
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
            key = applier(event, obj)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            self._complain(kind, f"ignored malformed {kind} {_describe(obj)}: {exc}")
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

    def endpoint_for_ip(self, ip: str) -> tuple[Slice, objects.Endpoint] | None:
        piece = self.endpoint_ips.get(ip)
        if piece is None:
            return None
        for endpoint in piece.endpoints:
            if endpoint.address == ip:
                return piece, endpoint
        return None

    # -- appliers: each returns the key the object is held under ----------------------------

    def _apply_namespace(self, event: str, obj: Any) -> str | None:
        name, labels = objects.to_namespace(obj)
        keep = event != "DELETED"
        settings = self.settings
        if keep and settings is not None:
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
        # The DNS service is kept whatever the filters say: ns.dns.<zone> is its address.
        if event == "DELETED" or not (key == DNS_SERVICE or self._wanted(service.namespace, labels)):
            self._remove_service(key)
            return None
        self._remove_service(key)
        self.services[key] = service
        for ip in service.ips:
            self.service_ips[ip] = service
        return key

    def _apply_slice(self, event: str, obj: Any) -> Key | None:
        pod_names = self.settings is None or self.settings.endpoint_pod_names
        piece, labels, trigger = objects.to_slice(obj, pod_names)
        key = (piece.namespace, piece.name)
        noendpoints = self.settings is not None and self.settings.noendpoints
        if event == "DELETED" or noendpoints or not self._wanted(piece.namespace, labels):
            existed = self._remove_slice(key)
            if existed is not None and event == "DELETED":
                self._observe_programming(existed, trigger)
            return None
        self._remove_slice(key)
        self.slices[key] = piece
        owner = (piece.namespace, piece.service)
        self.service_slices[owner] = (*self.service_slices.get(owner, ()), piece)
        for endpoint in piece.endpoints:
            self.endpoint_ips[endpoint.address] = piece
        self._observe_programming(piece, trigger)
        return key

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
            if self.service_ips.get(ip) is service:
                del self.service_ips[ip]

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
        for endpoint in piece.endpoints:
            ip = endpoint.address
            if self.endpoint_ips.get(ip) is piece:
                del self.endpoint_ips[ip]
                # Another slice may hold the same address (an endpoint moving between
                # slices): keep it findable.
                for other in rest:
                    if any(other_endpoint.address == ip for other_endpoint in other.endpoints):
                        self.endpoint_ips[ip] = other
                        break
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


def _describe(obj: Any) -> str:
    """namespace/name of a raw object when it has them, for log lines."""
    try:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", "?"))[:100]
        namespace = meta.get("namespace")
        return f"{str(namespace)[:100]}/{name}" if namespace else name
    except AttributeError:
        return "(not an object)"
