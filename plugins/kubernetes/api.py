"""The API source: list and watch the Kubernetes API server into the index.

Per kind (Namespaces, Services, EndpointSlices of discovery.k8s.io/v1, and Pods when a pods
mode or autopath needs them) one reflector runs forever:

* a paginated list (``limit`` 500) applied through ``index.begin_list``/``apply``/``end_list``:
  ``end_list`` drops what the list no longer holds, so a relist also removes objects deleted
  while we were not watching;
* then a watch from the list's resourceVersion with bookmarks, resumed from the last
  resourceVersion seen (event or bookmark) when the stream ends (the server's
  ``timeoutSeconds``) or breaks;
* 410 Gone (as an HTTP status or as an ERROR event in the stream) means our resourceVersion
  was compacted away: relist (``coredns_kubernetes_relists_total``);
* any other failure (refused connection, 5xx, a broken stream, bad JSON) waits an
  exponential backoff with jitter, 0.5 s doubling to 30 s and reset by the next success,
  then resumes (``coredns_kubernetes_watch_restarts_total``). Nothing here ever ends the
  task but cancellation, and the index keeps everything it held while the API is away.

``index.mark_synced()`` runs once every kind finished its first list.

We watch cluster-wide, as CoreDNS does (its RBAC is a ClusterRole to list/watch), and drop
objects of namespaces the ``namespaces`` option does not list before they reach the index.
Selectors go to the API server: ``namespace_labels`` on Namespaces, ``labels`` on Services,
EndpointSlices and Pods (CoreDNS applies it to all three), and for Pods CoreDNS's
``status.phase!=Succeeded,status.phase!=Failed,status.phase!=Unknown``, or with
``pods local NODE`` only ``spec.nodeName=NODE,status.phase=Running``: a pod that leaves
Running then arrives as DELETED, as the API server sends objects leaving a field selection.

Cost: the client is kubernetes-asyncio's ``ApiClient`` (configuration, TLS, bearer tokens
and their refresh), but responses are read raw (``_preload_content=False``) and decoded
with ``json``: its model classes would cost seconds and hundreds of megabytes at 50k pods,
and its ``Watch`` helper hides the 410s we act on. List pages are decoded one item at a time
with the garbage collector paused (``parse_list``, ``_no_gc``) and the C heap is trimmed
after each full list: at 50k Pods that halves the sync time and saves 35 MB of RSS. Importing the ``kubernetes_asyncio``
package the usual way loads all its ~700 model classes and ~60 API classes, about 40 MB
and 0.4 s; ``_lean_import`` loads only the modules used here (about 2 MB), and the
package completes itself on first use of anything else (see there).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import importlib.util
import json
import os
import random
import re
import ssl
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from resolver import __version__
from resolver.logs import plugin_logger

if TYPE_CHECKING:
    from plugins.kubernetes.index import Index
    from plugins.kubernetes.settings import Settings
    from resolver.metrics import CounterVec, Metrics

log = plugin_logger("kubernetes")

_PACKAGES = ("kubernetes_asyncio", "kubernetes_asyncio.client", "kubernetes_asyncio.client.models")


def _lean_import() -> None:
    """Import kubernetes-asyncio's client machinery without its models and generated APIs.

    The packages ``kubernetes_asyncio``, ``.client`` and ``.client.models`` are registered
    with their real paths but without running their ``__init__`` (which imports every model
    and API class), so importing ``client.api_client`` or ``config`` loads just those
    modules. Each such package gets a module ``__getattr__``: the first time anyone asks it
    for a name it does not hold (``from kubernetes_asyncio.client import V1Pod``), it runs
    its real ``__init__`` and answers, so other code in the process sees the whole package.
    Nothing happens when the package was already imported.
    """
    if "kubernetes_asyncio" in sys.modules:
        return
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return  # an unexpected layout: fall back to the ordinary (full) import
        module = importlib.util.module_from_spec(spec)
        module.__getattr__ = _completer(module, spec)  # type: ignore[method-assign]
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    from kubernetes_asyncio.client.api_client import ApiClient
    from kubernetes_asyncio.client.configuration import Configuration

    # config.kube_config does ``from kubernetes_asyncio.client import ApiClient, Configuration``.
    client = sys.modules["kubernetes_asyncio.client"]
    client.ApiClient = ApiClient  # type: ignore[attr-defined]
    client.Configuration = Configuration  # type: ignore[attr-defined]


def _completer(module: Any, spec: Any) -> Callable[[str], Any]:
    def complete(name: str) -> Any:
        # ``from package import submodule`` asks for the attribute first: import just that.
        if not name.startswith("__") and importlib.util.find_spec(f"{module.__name__}.{name}") is not None:
            return importlib.import_module(f"{module.__name__}.{name}")
        # Any other name the lean package does not hold: run the package's real __init__ once.
        if module.__dict__.pop("__getattr__", None) is None:
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
        spec.loader.exec_module(module)
        return getattr(module, name)

    return complete


_lean_import()

from kubernetes_asyncio.client.api_client import ApiClient  # noqa: E402
from kubernetes_asyncio.client.configuration import Configuration  # noqa: E402
from kubernetes_asyncio.config import incluster_config, kube_config  # noqa: E402

# Tunables (module level so tests can shorten them).
PAGE_SIZE = 500
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
#: Server-side watch timeout; each watch picks a random value in [WATCH_TIMEOUT, 2*WATCH_TIMEOUT)
#: (client-go's rule) so that the watches of many nodes do not all restart together.
WATCH_TIMEOUT = 300.0
CONNECT_TIMEOUT = 10.0
LIST_READ_TIMEOUT = 60.0
#: In-cluster service account files (tests point them elsewhere).
SERVICE_TOKEN_FILE = incluster_config.SERVICE_TOKEN_FILENAME
SERVICE_CA_FILE = incluster_config.SERVICE_CERT_FILENAME

# The field selector CoreDNS puts on its cluster-wide pod watch: no finished pods.
_LIVE_PODS = "status.phase!=Succeeded,status.phase!=Failed,status.phase!=Unknown"


# -- what to watch -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One list/watch: the index kind and the API path and selectors that fill it."""

    kind: str
    path: str
    label_selector: str | None = None
    field_selector: str | None = None

    def selectors(self) -> list[tuple[str, str]]:
        params = []
        if self.label_selector:
            params.append(("labelSelector", self.label_selector))
        if self.field_selector:
            params.append(("fieldSelector", self.field_selector))
        return params


def resources(settings: Settings) -> list[Resource]:
    """The list/watches a configuration needs (read when the source starts: autopath's
    ``connect`` may have asked for pods after the settings were parsed)."""
    wanted = [
        Resource("Namespace", "/api/v1/namespaces", settings.namespace_labels),
        Resource("Service", "/api/v1/services", settings.labels),
    ]
    if not settings.noendpoints:  # CoreDNS drops the endpoints watch with noendpoints
        wanted.append(Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", settings.labels))
    if settings.watch_pods:
        if settings.pods == "local" and settings.pods_node:
            fields = f"spec.nodeName={settings.pods_node},status.phase=Running"
        else:
            fields = _LIVE_PODS
        wanted.append(Resource("Pod", "/api/v1/pods", settings.labels, fields))
    return wanted


# -- where the client configuration comes from -------------------------------------------------


class Credentials:
    """The client configuration, chosen as CoreDNS (and issue #6) chooses it:

    * ``kubeconfig FILE [CONTEXT]`` when given (CoreDNS ignores ``endpoint`` then);
    * else ``endpoint URL`` with ``tls CERT KEY CACERT`` if given;
    * else the in-cluster service account (KUBERNETES_SERVICE_HOST/PORT, token, CA).

    Everything that can be checked without I/O on the network is checked here, so a bad
    path or context is a one-line ``ValueError`` when the plugin starts, not a retry loop.
    """

    def __init__(self, settings: Settings, corefile_dir: str) -> None:
        self._kubeconfig: tuple[str, str | None] | None = None
        self._loader: Any = None
        self._incluster: Any = None
        self.endpoint: str | None = None
        self.tls: tuple[str, str, str] | None = None
        if settings.kubeconfig is not None:
            path, context = settings.kubeconfig
            path = _absolute(path, corefile_dir)
            if not os.path.isfile(path):
                raise ValueError(f"kubeconfig {path}: no such file")
            self._kubeconfig = (path, context)
            try:
                self._loader = self._read_kubeconfig()
            except Exception as exc:  # ConfigException, YAML errors, asserts on a missing context
                raise ValueError(f"kubeconfig {path}: {_one_line(exc) or 'no usable context'}") from None
            self.description = f"kubeconfig {path}" + (f" context {context}" if context else "")
        elif settings.endpoint:
            endpoint = settings.endpoint.rstrip("/")
            if not endpoint.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {settings.endpoint}: must be an http:// or https:// URL")
            self.endpoint = endpoint
            if settings.tls is not None:
                cert, key, ca = (_absolute(path, corefile_dir) for path in settings.tls)
                for path in (cert, key, ca):
                    if not os.path.isfile(path):
                        raise ValueError(f"tls {path}: no such file")
                try:  # the files load as the client will load them
                    ssl.create_default_context(cafile=ca).load_cert_chain(cert, keyfile=key)
                except (ssl.SSLError, OSError) as exc:
                    raise ValueError(f"tls {cert} {key} {ca}: {_one_line(exc)}") from None
                self.tls = (cert, key, ca)
            self.description = f"endpoint {endpoint}"
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            self._incluster = incluster_config.InClusterConfigLoader(
                token_filename=SERVICE_TOKEN_FILE, cert_filename=SERVICE_CA_FILE
            )
            try:
                self._incluster.load_and_set(Configuration())  # reads the token and CA now
            except Exception as exc:
                raise ValueError(f"in-cluster configuration: {_one_line(exc)}") from None
            self.description = "in-cluster service account"
        else:
            raise ValueError(
                "no endpoint or kubeconfig given, and not running in a cluster (KUBERNETES_SERVICE_HOST is unset)"
            )

    async def configuration(self) -> Configuration:
        configuration = Configuration()
        if self._loader is not None:
            await self._loader.load_and_set(configuration)  # may run an exec credential plugin
        elif self._incluster is not None:
            self._incluster.load_and_set(configuration)  # installs the token refresh hook
        else:
            assert self.endpoint is not None
            configuration.host = self.endpoint
            if self.tls is not None:
                configuration.cert_file, configuration.key_file, configuration.ssl_ca_cert = self.tls
        return configuration

    async def refresh(self, configuration: Configuration) -> None:
        """After a 401: read the kubeconfig again and load its credentials (a rotated token,
        an expired exec or OIDC token). The in-cluster token refreshes itself (a hook
        re-reads the file every minute)."""
        if self._kubeconfig is not None:
            self._loader = self._read_kubeconfig()
            await self._loader.load_and_set(configuration)

    def _read_kubeconfig(self) -> Any:
        assert self._kubeconfig is not None
        path, context = self._kubeconfig
        return kube_config._get_kube_config_loader_for_yaml_file(path, active_context=context)


def _absolute(path: str, corefile_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.join(corefile_dir or os.getcwd(), path)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


# -- errors and backoff ------------------------------------------------------------------------


class ApiError(Exception):
    """The API server answered a request with an error status (or an ERROR event)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}".strip())
        self.status = status


class Gone(ApiError):
    """410: the resourceVersion (or continue token) is older than the server's history."""

    def __init__(self, message: str) -> None:
        super().__init__(410, message)


class Backoff:
    """Exponential backoff with jitter: BACKOFF_INITIAL doubling up to BACKOFF_MAX, each
    delay spread by ±25% so that many nodes do not come back at the same instant."""

    def __init__(self) -> None:
        self.failures = 0

    def next(self) -> float:
        delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** min(self.failures, 30))
        self.failures += 1
        return delay * random.uniform(0.75, 1.25)

    def reset(self) -> None:
        self.failures = 0


# -- reading a list page ------------------------------------------------------------------------

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip(text: str, position: int) -> int:
    """The position after any JSON whitespace at ``position``."""
    return _WHITESPACE.match(text, position).end()  # type: ignore[union-attr]


def parse_list(text: str, on_item: Callable[[Any], int]) -> tuple[dict[str, Any], int]:
    """Read a list response (``{"kind": ..., "metadata": {...}, "items": [...]}``) and hand
    each item to ``on_item`` as soon as it is decoded; the list's metadata and the sum of
    what ``on_item`` returned.

    Why not ``json.loads`` the page: a page of 500 Pods decodes to some 20 MB of small
    objects, alive until the last item is applied. The index's long-lived objects are
    allocated among them, so the allocator's arenas stay pinned when the page is freed:
    at 50k Pods that fragmentation cost 30 MB of RSS. Decoding one item at a time keeps
    the garbage to one object. Raises ValueError for anything that is not such a list.
    """
    end = len(text)
    position = _skip(text, 0)
    if position >= end or text[position] != "{":
        raise ValueError("the list response is not a JSON object")
    metadata: dict[str, Any] = {}
    applied = 0
    position = _skip(text, position + 1)
    if position < end and text[position] == "}":
        return metadata, applied
    while True:
        if position >= end or text[position] != '"':
            raise ValueError(f"malformed list response at offset {position}")
        key, position = json.decoder.scanstring(text, position + 1)
        position = _skip(text, position)
        if position >= end or text[position] != ":":
            raise ValueError(f"malformed list response at offset {position}")
        position = _skip(text, position + 1)
        if key == "items" and text.startswith("[", position):
            position = _skip(text, position + 1)
            if text.startswith("]", position):
                position += 1
            else:
                while True:
                    item, position = _DECODER.raw_decode(text, position)
                    applied += on_item(item)
                    del item
                    position = _skip(text, position)
                    if text.startswith(",", position):
                        position = _skip(text, position + 1)
                    elif text.startswith("]", position):
                        position += 1
                        break
                    else:
                        raise ValueError(f"malformed list items at offset {position}")
        else:
            value, position = _DECODER.raw_decode(text, position)
            if key == "metadata" and isinstance(value, dict):
                metadata = value
        position = _skip(text, position)
        if text.startswith(",", position):
            position = _skip(text, position + 1)
        elif text.startswith("}", position):
            return metadata, applied
        else:
            raise ValueError(f"malformed list response at offset {position}")


def _load_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _load_trim() if sys.platform.startswith("linux") else None


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system after a full list.

    Page bodies (a few MB each) come from glibc's heap once its adaptive mmap threshold has
    risen; after the list the heap is mostly free but not returned: about 10 MB of RSS at
    50k Pods. ``malloc_trim`` returns it in a millisecond; it runs once per full list.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a page is decoded and applied.

    Decoding creates some 100k containers per page; each burst triggers collections that
    walk the whole, growing index (half the sync time at 50k Pods). Decoded JSON holds no
    reference cycles, so reference counting frees it all the same. Nothing else runs on
    the loop meanwhile: the pause ends before the next await.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -- one kind: list, then watch forever --------------------------------------------------------


class Reflector:
    """Keeps the index's objects of one kind equal to the API server's."""

    def __init__(self, source: ApiSource, resource: Resource) -> None:
        self.source = source
        self.resource = resource
        self.kind = resource.kind
        self.listed = asyncio.Event()  # the first list finished
        self.backoff = Backoff()
        #: Where to resume: the resourceVersion of the last list, event or bookmark applied
        #: (kept here, not in a local, so a watch that breaks off still advanced it).
        #: None: list first.
        self.version: str | None = None
        self._failing = False  # inside a streak of failures (log the first one only)

    async def run(self) -> None:
        gone_streak = 0
        while True:
            try:
                if self.version is None:
                    self.version = await self._list()
                    self.listed.set()
                    gone_streak = 0
                    self._recovered()
                await self._watch(self.version)
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                self.source.relists.inc((self.kind,))
                log.info("%s: resource version expired (%s), listing again", self.kind, exc)
                self.version = None
                gone_streak += 1
                if gone_streak > 1:  # a relist did not help: do not hammer the server
                    await asyncio.sleep(self.backoff.next())
            except Exception as exc:  # the API server is down or misbehaving: retry, keep the index
                self.source.restarts.inc((self.kind,))
                delay = self.backoff.next()
                self._failed(exc, delay)
                await asyncio.sleep(delay)

    # -- list ----------------------------------------------------------------------------------

    async def _list(self) -> str:
        """Apply a full paginated list; its resourceVersion, the point to watch from."""
        index = self.source.index
        index.begin_list(self.kind)
        token: str | None = None
        count = 0
        while True:
            params: list[tuple[str, Any]] = [("limit", PAGE_SIZE), *self.resource.selectors()]
            if token:
                params.append(("continue", token))
            timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=LIST_READ_TIMEOUT)
            response = await self.source.get(self.resource.path, params, timeout)
            try:
                await self.source.check(response)
                body = await response.read()
            finally:
                response.release()
            with _no_gc():
                metadata, applied = parse_list(body.decode("utf-8"), self._apply_added)
            del body
            count += applied
            self.backoff.reset()  # a page arrived: the server is back
            token = metadata.get("continue")
            if not token:
                version = metadata.get("resourceVersion")
                if not version:
                    raise ValueError("the list response has no metadata.resourceVersion")
                index.end_list(self.kind)
                log.debug("%s: listed %d objects at resource version %s", self.kind, count, version)
                _trim_heap()
                return str(version)

    # -- watch ---------------------------------------------------------------------------------

    async def _watch(self, version: str) -> None:
        """Watch from ``version`` until the stream ends, advancing ``self.version``."""
        seconds = int(WATCH_TIMEOUT * (1 + random.random()))
        params: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", seconds),
            *self.resource.selectors(),
        ]
        # The server ends the stream after `seconds`; a read that waits much longer than
        # that means a connection that died without a word.
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=seconds + 30)
        response = await self.source.get(self.resource.path, params, timeout)
        try:
            await self.source.check(response)
            content = response.content
            while True:
                line = await content.readline()
                if not line:
                    return  # the server's timeout: watch again from self.version
                if line.strip():
                    self.version = self._event(line, self.version or version)
                    if self._failing or self.backoff.failures:
                        self.backoff.reset()
                        self._recovered()
        finally:
            response.close()

    def _event(self, line: bytes, version: str) -> str:
        """Apply one watch event; the resourceVersion to resume from after it."""
        event = json.loads(line)
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise ValueError(f"malformed watch event: {line[:200]!r}")
        if kind == "ERROR":
            code = obj.get("code")
            message = str(obj.get("message") or obj.get("reason") or "")
            if code == 410:
                raise Gone(message)
            raise ApiError(code if isinstance(code, int) else 0, f"in the watch stream: {message}")
        metadata = obj.get("metadata")
        current = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._apply(kind, obj)
        elif kind != "BOOKMARK":
            log.warning("%s: ignored a watch event of unknown type %r", self.kind, kind)
        return str(current) if current else version

    def _apply_added(self, obj: Any) -> int:
        return self._apply("ADDED", obj)

    def _apply(self, event: str, obj: Any) -> int:
        """Hand one object to the index (unless its namespace is not served); 1 if handed."""
        if not isinstance(obj, dict):
            return 0
        namespaces = self.source.namespaces
        if namespaces:
            metadata = obj.get("metadata")
            if not isinstance(metadata, dict):
                return 0
            name = metadata.get("name") if self.kind == "Namespace" else metadata.get("namespace")
            if name not in namespaces:
                return 0
        try:
            self.source.index.apply(self.kind, event, obj)
        except Exception:  # the index promises not to raise; one bad object must not stop the watch
            log.exception("%s: the index failed on an object; skipped", self.kind)
            return 0
        return 1

    # -- logging a failure streak once -----------------------------------------------------------

    def _failed(self, error: Exception, delay: float) -> None:
        text = _describe(error)
        if not self._failing:
            log.warning("%s: list/watch failed: %s; retrying (backoff %.1fs)", self.kind, text, delay)
            self._failing = True
        else:
            log.debug("%s: list/watch failed again: %s; retrying in %.1fs", self.kind, text, delay)

    def _recovered(self) -> None:
        if self._failing:
            log.info("%s: list/watch recovered", self.kind)
            self._failing = False


def _describe(error: Exception) -> str:
    """A short reason for the log line (aiohttp's own texts for a cut stream run long)."""
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return f"the connection broke off ({type(error).__name__})"
    text = _one_line(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- the source --------------------------------------------------------------------------------


class ApiSource:
    """Fills the index from the API server; ``run`` until cancelled."""

    def __init__(self, settings: Settings, index: Index, metrics: Metrics | None, credentials: Credentials) -> None:
        self.settings = settings
        self.index = index
        self.credentials = credentials
        self.namespaces = frozenset(settings.namespaces)
        self.restarts = _counter(
            metrics,
            "coredns_kubernetes_watch_restarts_total",
            "Restarts of a Kubernetes list or watch after an error, per kind.",
        )
        self.relists = _counter(
            metrics,
            "coredns_kubernetes_relists_total",
            "Full relists of a Kubernetes kind after its resource version expired (410 Gone).",
        )
        self._api: ApiClient | None = None
        self._configuration: Configuration | None = None

    async def run(self) -> None:
        api, configuration = await self._connect()
        self._api, self._configuration = api, configuration
        reflectors = [Reflector(self, resource) for resource in resources(self.settings)]
        tasks = [asyncio.create_task(r.run(), name=f"kubernetes {r.kind} watch") for r in reflectors]
        try:
            for reflector in reflectors:
                await reflector.listed.wait()
            self.index.mark_synced()
            log.info("synced with the API server (%s)", self.credentials.description)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._api = None
            await api.close()  # closes the aiohttp session and its connections

    async def _connect(self) -> tuple[ApiClient, Configuration]:
        """The client. Loading its configuration may fail (a kubeconfig's exec plugin, its
        certificates): retry with backoff, as for the API server itself."""
        backoff = Backoff()
        while True:
            try:
                configuration = await self.credentials.configuration()
                api = ApiClient(configuration)  # builds the TLS context from the files
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                reason = _describe(exc)
                log.warning("loading %s failed: %s; retrying in %.1fs", self.credentials.description, reason, delay)
                await asyncio.sleep(delay)
            else:
                api.user_agent = f"corefile-resolver/{__version__}"
                return api, configuration

    async def get(self, path: str, params: list[tuple[str, Any]], timeout: aiohttp.ClientTimeout) -> Any:
        """GET ``path`` through kubernetes-asyncio's ApiClient (bearer token, TLS, headers),
        unparsed: the aiohttp response, whatever its status."""
        assert self._api is not None
        return await self._api.call_api(
            path,
            "GET",
            query_params=params,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )

    async def check(self, response: aiohttp.ClientResponse) -> None:
        """Raise ``Gone`` for 410 and ``ApiError`` for any other non-200 status (with the
        Status message the API server sent)."""
        if response.status == 200:
            return
        body = await response.read()
        message = ""
        try:
            decoded = json.loads(body)
            if isinstance(decoded, dict):
                message = str(decoded.get("message") or decoded.get("reason") or "")
        except ValueError:
            message = body[:200].decode("utf-8", "replace")
        if response.status == 410:
            raise Gone(message)
        if response.status == 401 and self._configuration is not None:
            await self.credentials.refresh(self._configuration)
        raise ApiError(response.status, message or (response.reason or ""))


def _counter(metrics: Metrics | None, name: str, help: str) -> CounterVec:
    if metrics is None:
        from resolver.metrics import CounterVec

        return CounterVec(name, help, ("kind",))
    return metrics.counter(name, help, ("kind",))


def api_source(settings: Settings, index: Index, metrics: Metrics | None, corefile_dir: str) -> ApiSource:
    """The source the plugin runs when no ``manifests`` directory is configured.

    Raises ValueError (one line) when the client cannot be configured (a missing kubeconfig
    or TLS file, an unknown context, no endpoint outside a cluster).
    """
    return ApiSource(settings, index, metrics, Credentials(settings, corefile_dir))
