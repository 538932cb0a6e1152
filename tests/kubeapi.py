"""A fake Kubernetes API server, in process, on 127.0.0.1: the list/watch protocol for the
four resources the kubernetes plugin reads (Namespaces, Services, Pods, EndpointSlices).

It speaks what the real API server speaks, closely enough that the real kubernetes-asyncio
client cannot tell: JSON lists with ``metadata.resourceVersion``, ``labelSelector`` and
``fieldSelector``, and watches as chunked newline-delimited JSON events (ADDED, MODIFIED,
DELETED, BOOKMARK, ERROR) from one global, monotonically increasing resourceVersion and an
event history. As the real server's watch cache does, a selected watch sees an object that
stops matching as DELETED and one that starts matching as ADDED, and a watch from a
resourceVersion older than the compacted history gets an ERROR event carrying a 410 Status.

Lists follow the real server's resourceVersion rules: ``resourceVersion=0`` is served by
the watch cache, which ignores ``limit`` (one response; with ``watch_cache = False``, a
server without one, it pages); no resourceVersion is a consistent read, paged by ``limit``
and ``continue`` over a snapshot (a token older than the compacted history gets 410); a
resourceVersion N with ``resourceVersionMatch=NotOlderThan`` (or none) is served from the
cache unpaged, or paged like etcd when ``limit`` is given (410 when N is compacted away);
N newer than the server's is a 504 "Too large resource version". Large lists are written
in pieces, as a real server streams them.

Tests drive it through methods: ``add``/``update``/``delete`` objects, ``compact`` the
history, ``drop_watches`` (abruptly) or ``end_watches`` (cleanly, as a watch timeout does),
``bookmark``, ``inject`` a raw line into a resource's watch history, ``fail`` the next N
requests (optionally with ``Retry-After``), answer the next watches with HTTP 410
(``gone``) or with an empty stream that ends at once (``empty_watches``), ``hold``
requests until ``release``, call ``on_list`` before each list request, ``stop``/``restart``
on the same port, and read ``requests``/``log`` to see what the client asked. Object
builders (``service``, ``endpointslice``, ``pod``, ``namespace``) return complete objects
(kind, apiVersion) that also serve as YAML manifests.

Usage::

    async with FakeKubeAPI() as api:
        api.add(namespace("default"), service("web", "default", "10.0.0.10"))
        ... Corefile: kubernetes cluster.local { endpoint {api.url} } ...
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import ssl
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """One API resource: its URL name, kind, group version and list kind."""

    plural: str
    kind: str
    api_version: str
    namespaced: bool

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


RESOURCES: dict[str, Resource] = {
    "namespaces": Resource("namespaces", "Namespace", "v1", namespaced=False),
    "services": Resource("services", "Service", "v1", namespaced=True),
    "pods": Resource("pods", "Pod", "v1", namespaced=True),
    "endpointslices": Resource("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", namespaced=True),
}
BY_KIND: dict[str, Resource] = {resource.kind: resource for resource in RESOURCES.values()}

# The field selectors the real API server supports for these resources (a subset of each):
# anything else is a 400, as there.
_FIELDS: dict[str, tuple[str, ...]] = {
    "namespaces": ("metadata.name", "status.phase"),
    "services": ("metadata.name", "metadata.namespace", "spec.clusterIP", "spec.type"),
    "pods": ("metadata.name", "metadata.namespace", "spec.nodeName", "status.phase", "status.podIP"),
    "endpointslices": ("metadata.name", "metadata.namespace", "addressType"),
}


# -- selectors ---------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``in (a, b)`` parentheses."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


_SET_REQUIREMENT = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")
_EQUALITY = re.compile(r"^([^!=\s]+)\s*(==|=|!=)\s*(\S*)$")


class LabelSelector:
    """Kubernetes label selector: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``,
    ``a`` (exists), ``!a`` (does not exist); requirements separated by commas are ANDed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.requirements: list[tuple[str, str, frozenset[str]]] = []
        for part in _split_top_level(text):
            set_match = _SET_REQUIREMENT.match(part)
            equality = _EQUALITY.match(part)
            if set_match:
                values = frozenset(v.strip() for v in set_match.group(3).split(",") if v.strip())
                self.requirements.append((set_match.group(1), set_match.group(2), values))
            elif equality:
                operator = "notin" if equality.group(2) == "!=" else "in"
                self.requirements.append((equality.group(1), operator, frozenset((equality.group(3),))))
            elif part.startswith("!") and re.fullmatch(r"![^\s=!(),]+", part):
                self.requirements.append((part[1:], "!exists", frozenset()))
            elif re.fullmatch(r"[^\s=!(),]+", part):
                self.requirements.append((part, "exists", frozenset()))
            else:
                raise ValueError(f"unable to parse requirement: {part!r}")

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        for key, operator, values in self.requirements:
            if operator == "exists" and key not in labels:
                return False
            if operator == "!exists" and key in labels:
                return False
            if operator == "in" and labels.get(key) not in values:
                return False
            if operator == "notin" and key in labels and labels[key] in values:
                return False
        return True


class FieldSelector:
    """``field=value``, ``field==value``, ``field!=value`` ANDed, over the fields a resource supports."""

    def __init__(self, text: str, resource: Resource) -> None:
        self.requirements: list[tuple[str, bool, str]] = []
        for part in _split_top_level(text):
            match = re.fullmatch(r"([A-Za-z.]+)\s*(==|=|!=)\s*(.*)", part)
            if match is None:
                raise ValueError(f"invalid field selector: {part!r}")
            name, operator, value = match.groups()
            if name not in _FIELDS[resource.plural]:
                raise ValueError(f'field label not supported: "{name}"')
            self.requirements.append((name, operator != "!=", value))

    def matches(self, obj: Obj) -> bool:
        for name, equal, value in self.requirements:
            current: Any = obj
            for step in name.split("."):
                current = current.get(step) if isinstance(current, dict) else None
            if ((current or "") == value) != equal:
                return False
        return True


# -- objects -----------------------------------------------------------------------------------


def key_of(obj: Obj) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return metadata.get("namespace") or "", metadata["name"]


def rv_of(obj: Obj) -> int:
    return int(obj["metadata"]["resourceVersion"])


def _with_rv(obj: Obj, rv: int) -> Obj:
    """A copy of ``obj`` with another resourceVersion; nested data stays shared (never mutated)."""
    copy = dict(obj)
    copy["metadata"] = {**obj["metadata"], "resourceVersion": str(rv)}
    return copy


def _item(obj: Obj) -> Obj:
    """A list item: the real API leaves kind and apiVersion out of the items of a typed list."""
    return {key: value for key, value in obj.items() if key not in ("kind", "apiVersion")}


@dataclass
class Event:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED, or RAW (``raw`` is sent as it is)
    old: Obj | None
    new: Obj  # for DELETED: the last state, carrying the deletion's resourceVersion
    raw: bytes = b""


@dataclass(eq=False)
class Watcher:
    resource: Resource
    namespace: str | None
    labels: LabelSelector | None
    fields: FieldSelector | None
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    def selects(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and (obj["metadata"].get("namespace") or "") != self.namespace:
            return False
        if self.labels is not None and not self.labels.matches(obj["metadata"].get("labels")):
            return False
        return self.fields is None or self.fields.matches(obj)

    def convert(self, event: Event) -> tuple[str, Obj] | None:
        """What this watch sees of ``event``: transitions across the selector become ADDED or
        DELETED (the real watch cache does the same), anything else outside it nothing."""
        if event.type == "RAW":
            return ("RAW", {"raw": event.raw})
        was, now = self.selects(event.old), self.selects(event.new)
        if event.type == "DELETED":
            return ("DELETED", event.new) if was else None
        if was and now:
            return ("MODIFIED", event.new)
        if now:
            return ("ADDED", event.new)
        if was and event.old is not None:
            # The previous content, at the event's resourceVersion (as the watch cache sends it).
            return ("DELETED", _with_rv(event.old, event.rv))
        return None


_WRITE_BATCH = 200  # list items per write of a large list
_DROP = object()  # close the connection abruptly
_END = object()  # end the stream cleanly (as timeoutSeconds does)


def status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 410: "Expired",
            429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}  # fmt: skip


@dataclass
class _Failure:
    remaining: int
    status: int  # 200: an empty watch stream, ended at once
    path: str | None
    watch_only: bool
    retry_after: float | None = None
    message: str | None = None


@dataclass
class Logged:
    """One request as the server saw it."""

    path: str
    query: dict[str, str]

    @property
    def watch(self) -> bool:
        return self.query.get("watch", "").lower() in ("true", "1")


# -- the server --------------------------------------------------------------------------------


class FakeKubeAPI:
    """The fake API server; see the module docstring."""

    def __init__(
        self, *, ssl_context: ssl.SSLContext | None = None, token: str | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.ssl_context = ssl_context
        #: When set, requests must carry ``Authorization: Bearer <token>`` (else 401).
        self.token = token
        self.host = host
        #: Lists at resourceVersion=0 come from a watch cache, which ignores ``limit``.
        self.watch_cache = True
        #: Called with each list request before it is answered (tests change state there).
        self.on_list: Callable[[Logged], None] | None = None
        self.port = 0
        self.rv = 1
        #: History holds the events after this resourceVersion; older watches get 410.
        self.compacted = 1
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {plural: {} for plural in RESOURCES}
        self.history: list[Event] = []
        self.watchers: set[Watcher] = set()
        self.requests: Counter[str] = Counter()
        self.log: list[Logged] = []
        self._failures: list[_Failure] = []
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._open = asyncio.Event()
        self._open.set()
        #: Requests waiting while the server is held (see ``hold``).
        self.held = 0

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> FakeKubeAPI:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/api/v1/{plural}", self._collection)
        app.router.add_get("/api/v1/namespaces/{namespace}/{plural}", self._collection)
        app.router.add_get("/apis/discovery.k8s.io/v1/{plural}", self._collection)
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{namespace}/{plural}", self._collection)
        app.router.add_get("/version", self._version)
        # handler_cancellation: a watch handler ends when its client goes away, as the real
        # server's does (open_watches() then counts only live watches).
        runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Stop listening and cut every open watch (the port stays ours for ``restart``)."""
        self.drop_watches()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def restart(self) -> None:
        """Listen again on the same port, with the same objects and history (an API server
        restart keeps etcd's state)."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> FakeKubeAPI:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- controls ------------------------------------------------------------------------------

    def add(self, *objs: Obj) -> list[Obj]:
        """Create (or replace, as MODIFIED) objects; each gets the next resourceVersion."""
        return [self._store(obj) for obj in objs]

    def update(self, obj: Obj) -> Obj:
        if key_of(obj) not in self.objects[BY_KIND[obj["kind"]].plural]:
            raise KeyError(f"{obj['kind']} {key_of(obj)} does not exist")
        return self._store(obj)

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        resource = BY_KIND[kind]
        old = self.objects[resource.plural].pop((namespace or "", name))
        self.rv += 1
        self._publish(Event(self.rv, resource.plural, "DELETED", old, _with_rv(old, self.rv)))

    def get(self, kind: str, namespace: str | None, name: str) -> Obj:
        return self.objects[BY_KIND[kind].plural][(namespace or "", name)]

    def load(self, objs: Iterable[Obj]) -> int:
        """Bulk-create objects with no history (as if long compacted): for large benchmarks."""
        count = 0
        for obj in objs:
            self.rv += 1
            stored = self._stamp(obj, None)
            self.objects[BY_KIND[obj["kind"]].plural][key_of(stored)] = stored
            count += 1
        self.compacted = self.rv
        return count

    def compact(self) -> None:
        """Forget the history up to now: watches from older resourceVersions get 410 Gone,
        and so do list continue tokens from older snapshots (as after etcd's compaction)."""
        self.compacted = self.rv
        self.history.clear()
        self._snapshots = {token: snap for token, snap in self._snapshots.items() if snap[0] >= self.compacted}

    def drop_watches(self) -> None:
        """Cut every open watch connection abruptly (the client sees a broken stream)."""
        for watcher in self.watchers:
            watcher.queue.put_nowait(_DROP)

    def end_watches(self) -> None:
        """End every open watch cleanly, as the server does when timeoutSeconds runs out."""
        for watcher in self.watchers:
            watcher.queue.put_nowait(_END)

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current resourceVersion to every watch that allows them."""
        for watcher in self.watchers:
            if watcher.bookmarks:
                watcher.queue.put_nowait(("BOOKMARK", self._bookmark_object(watcher.resource)))

    def inject(self, kind: str, line: bytes) -> None:
        """Put a raw line (garbage, say) into the watch history of ``kind`` at the next
        resourceVersion: every watch of that kind gets it, and so does every watch resumed
        from before it, until the history is compacted."""
        self.rv += 1
        self._publish(Event(self.rv, BY_KIND[kind].plural, "RAW", None, {}, raw=line.rstrip(b"\n") + b"\n"))

    def fail(
        self,
        times: int,
        status: int = 500,
        path: str | None = None,
        watch_only: bool = False,
        retry_after: float | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``times`` requests (whose path contains ``path``, if given) with
        ``status`` (and a ``Retry-After`` header, and the Status ``message``, if given)."""
        self._failures.append(_Failure(times, status, path, watch_only, retry_after, message))

    def gone(self, times: int = 1, path: str | None = None) -> None:
        """Answer the next ``times`` watch requests with HTTP 410 directly (no stream)."""
        self.fail(times, 410, path, watch_only=True)

    def empty_watches(self, times: int = 1, path: str | None = None) -> None:
        """Answer the next ``times`` watch requests with 200 and a stream that ends at once."""
        self.fail(times, 200, path, watch_only=True)

    def hold(self) -> None:
        """Accept requests but answer none until ``release`` (an API server that is slow to
        answer; benchmarks use it to measure a client before its first list arrives)."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def watches(self, path: str | None = None) -> list[Logged]:
        """The watch requests received so far (optionally only those for ``path``)."""
        return [entry for entry in self.log if entry.watch and (path is None or entry.path == path)]

    def lists(self, path: str | None = None) -> list[Logged]:
        return [entry for entry in self.log if not entry.watch and (path is None or entry.path == path)]

    def open_watches(self, plural: str | None = None) -> int:
        return sum(1 for watcher in self.watchers if plural is None or watcher.resource.plural == plural)

    # -- storage -------------------------------------------------------------------------------

    def _stamp(self, obj: Obj, old: Obj | None) -> Obj:
        resource = BY_KIND[obj["kind"]]
        metadata = dict(obj["metadata"])
        if resource.namespaced:
            metadata.setdefault("namespace", "default")
        else:
            metadata.pop("namespace", None)
        old_metadata = (old or {}).get("metadata") or {}
        metadata["uid"] = old_metadata.get("uid") or metadata.get("uid") or str(uuid.uuid4())
        metadata.setdefault("creationTimestamp", old_metadata.get("creationTimestamp") or "2024-01-01T00:00:00Z")
        metadata["resourceVersion"] = str(self.rv)
        stored = dict(obj)
        stored["apiVersion"] = resource.api_version
        stored["metadata"] = metadata
        return stored

    def _store(self, obj: Obj) -> Obj:
        resource = BY_KIND[obj["kind"]]
        store = self.objects[resource.plural]
        self.rv += 1
        old = store.get(key_of(self._stamp(obj, None)))
        stored = self._stamp(obj, old)
        store[key_of(stored)] = stored
        self._publish(Event(self.rv, resource.plural, "MODIFIED" if old else "ADDED", old, stored))
        return stored

    def _publish(self, event: Event) -> None:
        self.history.append(event)
        for watcher in self.watchers:
            if watcher.resource.plural == event.resource:
                seen = watcher.convert(event)
                if seen is not None:
                    watcher.queue.put_nowait(seen)

    def _bookmark_object(self, resource: Resource) -> Obj:
        return {"kind": resource.kind, "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self.rv), "creationTimestamp": None}}  # fmt: skip

    # -- HTTP ----------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        entry = Logged(request.path, dict(request.query))
        self.log.append(entry)
        self.requests[request.path] += 1
        if not self._open.is_set():
            self.held += 1
            try:
                await self._open.wait()
            finally:
                self.held -= 1
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(401, "Unauthorized")
        for failure in self._failures:
            if failure.remaining > 0 and (failure.path is None or failure.path in request.path):
                if failure.watch_only and not entry.watch:
                    continue
                failure.remaining -= 1
                if failure.status == 200:
                    empty = web.StreamResponse(headers={"Content-Type": "application/json"})
                    empty.enable_chunked_encoding()
                    await empty.prepare(request)
                    await empty.write_eof()
                    return empty
                message = failure.message or (
                    "too old resource version" if failure.status == 410 else "injected failure"
                )
                answer = self._status(failure.status, message)
                if failure.retry_after is not None:
                    answer.headers["Retry-After"] = f"{failure.retry_after:g}"
                return answer
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await handler(request)  # type: ignore[no-any-return]
        finally:
            if task is not None:
                self._handlers.discard(task)

    def _status(self, code: int, message: str) -> web.Response:
        body = status(code, _REASONS.get(code, "Unknown"), message)
        return web.json_response(body, status=code)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "30", "gitVersion": "v1.30.0-fake"})

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        plural = request.match_info["plural"]
        resource = RESOURCES.get(plural)
        group = "discovery.k8s.io/v1" if request.path.startswith("/apis/") else "v1"
        if resource is None or resource.api_version != group:
            return self._status(404, f"the server could not find the requested resource ({request.path})")
        namespace = request.match_info.get("namespace")
        if namespace is not None and not resource.namespaced:
            return self._status(404, "the server could not find the requested resource")
        query = request.query
        try:
            labels = LabelSelector(query["labelSelector"]) if query.get("labelSelector") else None
            fields = FieldSelector(query["fieldSelector"], resource) if query.get("fieldSelector") else None
        except ValueError as exc:
            return self._status(400, str(exc))
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        watcher = Watcher(resource, namespace, labels, fields, bookmarks)
        if query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, watcher)
        if self.on_list is not None:
            self.on_list(Logged(request.path, dict(query)))
        return await self._list(request, watcher, query)

    async def _list(self, request: web.Request, watcher: Watcher, query: Mapping[str, str]) -> web.StreamResponse:
        token = query.get("continue")
        rv_text = query.get("resourceVersion", "")
        match = query.get("resourceVersionMatch", "")
        try:
            limit = int(query.get("limit") or 0)
            asked = int(rv_text) if rv_text else None
        except ValueError:
            return self._status(400, "invalid limit or resourceVersion")
        if match not in ("", "NotOlderThan", "Exact") or (match and asked is None):
            return self._status(400, f"invalid resourceVersionMatch {match!r} with resourceVersion {rv_text!r}")
        if token and rv_text:
            return self._status(400, "specifying resource version is not allowed when using continue")
        if asked is not None and asked > self.rv:
            return self._status(504, f"Too large resource version: {asked}, current: {self.rv}")
        if asked == 0 and self.watch_cache:
            limit = 0  # the watch cache ignores limit
        elif asked and (limit or match == "Exact") and asked < self.compacted:
            # Paged (or exact) reads at a version come from etcd: compacted away.
            return self._status(410, f"too old resource version: {asked} ({self.compacted})")
        # Else unpaged at a version: the watch cache's current state, not older than asked.
        if token:
            try:
                snapshot_id, offset_text = base64.urlsafe_b64decode(token.encode()).decode().split(":")
                offset = int(offset_text)
            except ValueError:
                return self._status(400, "invalid continue token")
            snapshot = self._snapshots.get(snapshot_id)
            if snapshot is None:
                return self._status(410, "The provided continue parameter is too old to display a consistent list")
            rv, items = snapshot
        else:
            rv = self.rv
            items = sorted(
                (obj for obj in self.objects[watcher.resource.plural].values() if watcher.selects(obj)), key=key_of
            )
            offset = 0
            snapshot_id = uuid.uuid4().hex
            self._snapshots[snapshot_id] = (rv, items)
        end = offset + limit if limit > 0 else len(items)
        page = items[offset:end]
        metadata: Obj = {"resourceVersion": str(rv)}
        if end < len(items):
            metadata["continue"] = base64.urlsafe_b64encode(f"{snapshot_id}:{end}".encode()).decode()
            metadata["remainingItemCount"] = len(items) - end
        else:
            self._snapshots.pop(snapshot_id, None)
        head = {"kind": watcher.resource.list_kind, "apiVersion": watcher.resource.api_version, "metadata": metadata}
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(json.dumps(head)[:-1].encode() + b', "items": [')
        for start in range(0, len(page), _WRITE_BATCH):
            batch = ", ".join(json.dumps(_item(obj)) for obj in page[start : start + _WRITE_BATCH])
            await response.write((", " if start else "").encode() + batch.encode())
        await response.write(b"]}")
        await response.write_eof()
        return response

    async def _watch(self, request: web.Request, watcher: Watcher) -> web.StreamResponse:
        query = request.query
        rv_text = query.get("resourceVersion", "")
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
            start = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            return self._status(400, "invalid resourceVersion or timeoutSeconds")
        # Everything up to registering the watcher happens without an await: no event can
        # fall between the replayed history and the live queue.
        backlog: list[tuple[str, Obj]] = []
        expired = start is not None and start < self.compacted
        if start is None:
            backlog = [("ADDED", obj) for obj in self.objects[watcher.resource.plural].values() if watcher.selects(obj)]
        elif not expired:
            for event in self.history:
                if event.rv > start and event.resource == watcher.resource.plural:
                    seen = watcher.convert(event)
                    if seen is not None:
                        backlog.append(seen)
        if not expired:
            self.watchers.add(watcher)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if expired:
                message = f"too old resource version: {start} ({self.compacted})"
                await response.write(_event("ERROR", status(410, "Expired", message)))
                return response
            for event_type, obj in backlog:
                await response.write(_event(event_type, obj))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout else None
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return response
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    return response
                if item is _END:
                    return response
                if item is _DROP:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                await response.write(_event(*item))
        except ConnectionError:
            return response
        finally:
            self.watchers.discard(watcher)


def _event(event_type: str, obj: Obj) -> bytes:
    if event_type == "RAW":
        return obj["raw"]  # type: ignore[no-any-return]
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


# -- object builders ---------------------------------------------------------------------------


def namespace(name: str, labels: Mapping[str, str] | None = None) -> Obj:
    metadata: Obj = {"name": name}
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata, "status": {"phase": "Active"}}


def service(
    name: str,
    ns: str = "default",
    cluster_ip: str | None = None,
    ports: Iterable[tuple[str, str, int]] = (("http", "TCP", 80),),
    *,
    cluster_ips: list[str] | None = None,
    external_name: str | None = None,
    labels: Mapping[str, str] | None = None,
    publish_not_ready: bool = False,
) -> Obj:
    """A Service: ClusterIP when ``cluster_ip`` is an address, headless when it is "None",
    ExternalName when ``external_name`` is given. Ports are (name, protocol, port)."""
    metadata: Obj = {"name": name, "namespace": ns}
    if labels:
        metadata["labels"] = dict(labels)
    spec: Obj = {
        "ports": [
            {"name": port_name, "protocol": protocol, "port": number, "targetPort": number}
            if port_name
            else {"protocol": protocol, "port": number, "targetPort": number}
            for port_name, protocol, number in ports
        ],
        "sessionAffinity": "None",
    }
    if external_name is not None:
        spec["type"] = "ExternalName"
        spec["externalName"] = external_name
    else:
        spec["type"] = "ClusterIP"
        ips = cluster_ips or [cluster_ip or "None"]
        spec["clusterIP"] = ips[0]
        spec["clusterIPs"] = ips
        spec["ipFamilies"] = ["IPv6" if ":" in ip else "IPv4" for ip in ips if ip != "None"] or ["IPv4"]
        spec["selector"] = {"app": name}
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec, "status": {"loadBalancer": {}}}


def endpointslice(
    name: str,
    ns: str,
    service_name: str,
    endpoints: Iterable[Mapping[str, Any]],
    ports: Iterable[tuple[str, str, int]] = (("http", "TCP", 80),),
    *,
    address_type: str = "IPv4",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Obj:
    """An EndpointSlice of ``service_name``; endpoints are dicts with ``ip`` (or ``ips``) and
    optionally ``hostname``, ``pod`` (targetRef name), ``ready`` (default True), ``node``."""
    metadata: Obj = {
        "name": name,
        "namespace": ns,
        "labels": {
            "kubernetes.io/service-name": service_name,
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            **(labels or {}),
        },
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    built: list[Obj] = []
    for endpoint in endpoints:
        ready = endpoint.get("ready", True)
        item: Obj = {
            "addresses": list(endpoint.get("ips") or [endpoint["ip"]]),
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
        }
        if endpoint.get("hostname"):
            item["hostname"] = endpoint["hostname"]
        if endpoint.get("pod"):
            item["targetRef"] = {"kind": "Pod", "namespace": ns, "name": endpoint["pod"], "uid": str(uuid.uuid4())}
        if endpoint.get("node"):
            item["nodeName"] = endpoint["node"]
        built.append(item)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": metadata,
        "addressType": address_type,
        "endpoints": built,
        # Unnamed ports have name "" in EndpointSlices (not absent, as in Services).
        "ports": [{"name": port_name, "protocol": protocol, "port": number} for port_name, protocol, number in ports],
    }


def pod(
    name: str,
    ns: str,
    ip: str | None,
    *,
    node: str = "node-1",
    phase: str = "Running",
    labels: Mapping[str, str] | None = None,
    ips: list[str] | None = None,
) -> Obj:
    metadata: Obj = {"name": name, "namespace": ns}
    if labels:
        metadata["labels"] = dict(labels)
    status_: Obj = {"phase": phase}
    if ip:
        status_["podIP"] = ip
        status_["podIPs"] = [{"ip": address} for address in (ips or [ip])]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.9"}]},
        "status": status_,
    }


async def wait_closed(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel and await tasks (helper for tests that run a source directly)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
