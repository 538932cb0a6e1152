"""The API source: list and watch the Kubernetes API server into the index.

Per kind (Namespaces, Services, EndpointSlices of discovery.k8s.io/v1, and Pods when a pods
mode or autopath needs them) one reflector runs forever, as client-go's does:

* a list, applied through ``index.begin_list``/``apply``/``end_list``: ``end_list`` drops
  what the list no longer holds, so a relist also removes objects deleted while we were not
  watching. Which list (client-go's rules, so that a thousand nodes starting or relisting
  together are served by the API server's watch cache, not by quorum reads of etcd):
  the first one at ``resourceVersion=0`` (the cache's current state; a cache ignores
  ``limit``, a server without one pages by 500); a relist at the last resourceVersion seen
  (``resourceVersionMatch=NotOlderThan``, unpaged: from the cache); a list whose version the
  server no longer has (410, or "too large resource version") at once again with no version
  (a consistent read, paged), which is also what a server that paged the first list gets;
* then a watch from the list's resourceVersion with bookmarks, resumed from the last
  resourceVersion seen (event or bookmark) when the stream ends (the server's
  ``timeoutSeconds``), breaks, or stays silent for ``WATCH_READ_TIMEOUT`` (a healthy API
  server sends a bookmark about every minute: silence that long is a dead connection, or an
  old server: either way, resuming is right and is not counted as a failure);
* 410 Gone (as an HTTP status or as an ERROR event in the stream) means our resourceVersion
  was compacted away: relist (``coredns_kubernetes_relists_total``). A relist needed again
  within ``RELIST_GUARD`` seconds of the previous one waits a backoff of its own first, so a
  server that answers every watch with 410 is not listed in a loop;
* a watch line that cannot be read (not JSON, not an event, too long) is re-sent by the
  server on every resume from the same resourceVersion: after ``BAD_EVENT_LIMIT`` such
  failures in a row at the same point, relist past it;
* any other failure (refused connection, 5xx, 429, a broken stream, a watch that ends at
  once with nothing in it) waits an exponential backoff with jitter, 0.5 s doubling to 30 s
  (or the server's ``Retry-After``, up to a minute) and reset by the next success, then
  resumes (``coredns_kubernetes_watch_restarts_total``). Nothing here ever ends the task but
  cancellation, and the index keeps everything it held while the API is away. Should a
  reflector's task die all the same (a bug), the source logs it and starts it again.

``index.mark_synced()`` runs once every kind finished its first list.

We watch cluster-wide, as CoreDNS does (its RBAC is a ClusterRole to list/watch), and drop
objects of namespaces the ``namespaces`` option does not list before they reach the index
(but for ``kube-system/kube-dns``: ``ns.dns.<zone>`` is its address whatever the filters).
Selectors go to the API server: ``namespace_labels`` on Namespaces, ``labels`` on
EndpointSlices and Pods (CoreDNS applies it to Services too; we leave that to the index,
which filters Services by ``labels`` itself, so that kube-dns is seen whatever its labels),
and for Pods CoreDNS's ``status.phase!=Succeeded,status.phase!=Failed,status.phase!=Unknown``,
or with ``pods local NODE`` only ``spec.nodeName=NODE,status.phase=Running``: a pod that
leaves Running then arrives as DELETED, as the API server sends objects leaving a field
selection.

Credentials: a 401 re-reads them once for all reflectors (the kubeconfig, or the in-cluster
token file, which is also re-read whenever it changes); when the TLS files the client uses
change (a rotated client certificate or CA), the client is built again.

Cost: the client is kubernetes-asyncio's ``ApiClient`` (configuration, TLS, bearer tokens),
but responses are read raw (``_preload_content=False``) and decoded with ``json``: its model
classes would cost seconds and hundreds of megabytes at 50k pods, and its ``Watch`` helper
hides the 410s we act on. A list is decoded as it arrives, one item at a time
(``ListReader``), with the garbage collector paused per chunk (``_no_gc``) and the loop
given back between chunks (queries are answered during a relist of 50k Pods), and the C
heap is trimmed after each full list. Importing the ``kubernetes_asyncio`` package the usual
way loads all its ~700 model classes and ~60 API classes, about 40 MB and 0.4 s;
``_lean_import`` loads only the modules used here (about 2 MB), and the package completes
itself on first use of anything else (see there).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import gc
import importlib.machinery
import importlib.util
import json
import os
import random
import re
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import aiohttp

from resolver import __version__
from resolver.logs import plugin_logger

if TYPE_CHECKING:
    from plugins.kubernetes.index import Index
    from plugins.kubernetes.settings import Settings
    from resolver.metrics import CounterVec, Metrics

log = plugin_logger("kubernetes")

_PACKAGES = ("kubernetes_asyncio", "kubernetes_asyncio.client", "kubernetes_asyncio.client.models")
#: Dunder names a lean package answers by completing itself (the real package defines them);
#: any other dunder probe (``__wrapped__``, ``__test__``...) is a plain AttributeError.
_PACKAGE_DUNDERS = frozenset(("__all__", "__version__", "__project__"))


def _lean_import() -> None:
    """Import kubernetes-asyncio's client machinery without its models and generated APIs.

    The packages ``kubernetes_asyncio``, ``.client`` and ``.client.models`` are registered
    with their real paths but without running their ``__init__`` (which imports every model
    and API class), so importing ``client.api_client`` or ``config`` loads just those
    modules. Each such package gets a module ``__getattr__``: the first time anyone asks it
    for a name it does not hold (``from kubernetes_asyncio.client import V1Pod``), it runs
    its real ``__init__`` and answers, so other code in the process sees the whole package.

    All three packages are found before any is registered (without importing a parent to
    find its child), so an unexpected layout falls back to the ordinary import whole, never
    half-lean. Nothing happens when the package was already imported.
    """
    if "kubernetes_asyncio" in sys.modules:
        log.debug("kubernetes_asyncio was imported before the kubernetes plugin: using it whole")
        return
    specs = []
    path: Any = None
    for name in _PACKAGES:
        spec = importlib.util.find_spec(name) if path is None else importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            log.debug("kubernetes_asyncio: no package %s where expected: importing it whole", name)
            return
        specs.append(spec)
        path = spec.submodule_search_locations
    for spec in specs:
        module = importlib.util.module_from_spec(spec)
        module.__getattr__ = _completer(module, spec)  # type: ignore[method-assign]
        sys.modules[spec.name] = module
        parent, _, child = spec.name.rpartition(".")
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
        if name.startswith("__") and name not in _PACKAGE_DUNDERS:
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")
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
from kubernetes_asyncio.client.exceptions import ApiException  # noqa: E402
from kubernetes_asyncio.config import incluster_config, kube_config  # noqa: E402

# Tunables (module level so tests can shorten them).
PAGE_SIZE = 500
#: Bytes of a list response decoded at a time, before the loop gets a turn (~15 Pods).
LIST_CHUNK = 64 * 1024
#: A list item (or the list's metadata) this large is malformed: no object comes near it
#: (etcd refuses values over 1.5 MiB), and an unreadable body must not be buffered whole.
MAX_PENDING = 16 * 1024 * 1024
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
#: Server-side watch timeout; each watch picks a random value in [WATCH_TIMEOUT, 2*WATCH_TIMEOUT)
#: (client-go's rule) so that the watches of many nodes do not all restart together.
WATCH_TIMEOUT = 300.0
#: A watch that delivers nothing (not even a bookmark) for this long is resumed.
WATCH_READ_TIMEOUT = 120.0
#: A watch that ends cleanly sooner than this with nothing in it is a failure (client-go's
#: "very short watch"): resuming it at once would loop.
SHORT_WATCH = 1.0
CONNECT_TIMEOUT = 10.0
LIST_READ_TIMEOUT = 60.0
#: A relist this soon after the previous list started waits the relist backoff first.
RELIST_GUARD = 60.0
#: Failures on unreadable watch data at one resourceVersion before relisting past it.
BAD_EVENT_LIMIT = 3
#: The longest ``Retry-After`` honoured.
RETRY_AFTER_MAX = 60.0
#: While not synced, a failure is logged as a warning again after this many seconds (else
#: once per outage): a pod stuck unready says why in its recent log.
UNSYNCED_WARNING_INTERVAL = 180.0
#: In-cluster service account files (tests point them elsewhere).
SERVICE_TOKEN_FILE = incluster_config.SERVICE_TOKEN_FILENAME
SERVICE_CA_FILE = incluster_config.SERVICE_CERT_FILENAME

# The field selector CoreDNS puts on its cluster-wide pod watch: no finished pods.
_LIVE_PODS = "status.phase!=Succeeded,status.phase!=Failed,status.phase!=Unknown"
#: The Service ``ns.dns.<zone>`` is the address of, seen whatever ``namespaces`` says.
_DNS_SERVICE = ("kube-system", "kube-dns")


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
        # No labelSelector: kube-dns must be seen whatever `labels` says (the index filters).
        Resource("Service", "/api/v1/services"),
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
        self._token: TokenFile | None = None
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
            # kubernetes-asyncio's loader builds the URL (an IPv6 host in brackets) and checks
            # the files; the token is ours to read (TokenFile), so that a 401 re-reads it.
            self._incluster = incluster_config.InClusterConfigLoader(
                token_filename=SERVICE_TOKEN_FILE, cert_filename=SERVICE_CA_FILE, try_refresh_token=False
            )
            try:
                self._incluster.load_and_set(Configuration())  # reads the token and CA now
            except Exception as exc:
                raise ValueError(f"in-cluster configuration: {_one_line(exc)}") from None
            self._token = TokenFile(SERVICE_TOKEN_FILE)
            self.description = "in-cluster service account"
        else:
            raise ValueError(
                "no endpoint or kubeconfig given, and not running in a cluster (KUBERNETES_SERVICE_HOST is unset)"
            )

    async def configuration(self) -> Configuration:
        configuration = Configuration()
        if self._loader is not None:
            await self._loader.load_and_set(configuration)  # may run an exec credential plugin
        elif self._incluster is not None and self._token is not None:
            self._incluster.load_and_set(configuration)
            self._token.install(configuration)
        else:
            assert self.endpoint is not None
            configuration.host = self.endpoint
            if self.tls is not None:
                configuration.cert_file, configuration.key_file, configuration.ssl_ca_cert = self.tls
        return configuration

    async def refresh(self, configuration: Configuration) -> None:
        """After a 401: read the credentials again (a rotated token, an expired exec or OIDC
        token in the kubeconfig, the in-cluster token file even if it looks unchanged)."""
        if self._kubeconfig is not None:
            self._loader = self._read_kubeconfig()
            await self._loader.load_and_set(configuration)
        elif self._token is not None:
            self._token.read(force=True)
            self._token.hook(configuration)

    def _read_kubeconfig(self) -> Any:
        assert self._kubeconfig is not None
        path, context = self._kubeconfig
        merged = kube_config.KubeConfigMerger(path).config
        return kube_config.KubeConfigLoader(config_dict=merged, active_context=context)

    @staticmethod
    def tls_files(configuration: Configuration) -> tuple[tuple[str, int, int, int] | tuple[str], ...]:
        """The TLS files a client built from ``configuration`` reads, with their identity
        (inode, modification time, size): a change means a rotated certificate or CA."""
        stamps: list[tuple[str, int, int, int] | tuple[str]] = []
        for path in (configuration.ssl_ca_cert, configuration.cert_file, configuration.key_file):
            if not path:
                continue
            try:
                status = os.stat(path)
            except OSError:
                stamps.append((path,))
            else:
                stamps.append((path, status.st_ino, status.st_mtime_ns, status.st_size))
        return tuple(stamps)


class TokenFile:
    """The in-cluster service account token, read again whenever the file changes (the
    kubelet rotates projected tokens hourly) and on demand after a 401. kubernetes-asyncio's
    own hook re-reads it at most once a minute, even after a 401."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.token: str | None = None
        self._stamp: tuple[int, int, int] | None = None
        self.read(force=True)

    def read(self, force: bool = False) -> str | None:
        try:
            status = os.stat(self.path)
            stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
            if force or stamp != self._stamp:
                with open(self.path, encoding="utf-8") as handle:
                    text = handle.read().strip()
                if text:  # a file caught being rewritten: keep the last token
                    self.token = f"Bearer {text}"
                    self._stamp = stamp
        except OSError:
            pass  # the mount is being swapped: keep the last token
        return self.token

    def hook(self, configuration: Configuration) -> None:
        """kubernetes-asyncio calls this before each request (``refresh_api_key_hook``)."""
        token = self.read()
        if token:
            configuration.api_key["BearerToken"] = token

    def install(self, configuration: Configuration) -> None:
        configuration.refresh_api_key_hook = self.hook
        self.hook(configuration)


def _absolute(path: str, corefile_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.join(corefile_dir or os.getcwd(), path)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


# -- errors and backoff ------------------------------------------------------------------------


class ApiError(Exception):
    """The API server answered a request with an error status (or an ERROR event)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {message}".strip())
        self.status = status
        self.message = message
        #: The server's Retry-After, in seconds (429, and 5xx under load).
        self.retry_after = retry_after


class Gone(ApiError):
    """410: the resourceVersion (or continue token) is older than the server's history."""

    def __init__(self, message: str) -> None:
        super().__init__(410, message)


class ExpiredContinue(Gone):
    """410 on a list's continue token: the list must start over."""


class BadData(ValueError):
    """A watch line that cannot be read as an event."""


class ShortWatch(Exception):
    """A watch that ended cleanly at once with nothing in it."""


def _version_unavailable(error: ApiError) -> bool:
    """The server cannot list at the resourceVersion asked: compacted away (410), or newer
    than its watch cache has seen (504 "Too large resource version", after a failover)."""
    return error.status == 410 or (error.status == 504 and "too large resource version" in error.message.lower())


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


# -- reading a list -----------------------------------------------------------------------------

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_INCOMPLETE = object()

# ListReader states: where in ``{"kind": ..., "metadata": {...}, "items": [...]}`` we are.
_START, _FIRST_KEY, _KEY, _COLON, _VALUE, _FIRST_ITEM, _ITEM, _AFTER_ITEM, _AFTER_VALUE, _DONE = range(10)


def _skip(text: str, position: int) -> int:
    """The position after any JSON whitespace at ``position``."""
    return _WHITESPACE.match(text, position).end()  # type: ignore[union-attr]


class ListReader:
    """Reads a list response (``{"kind": ..., "metadata": {...}, "items": [...]}``) as its
    bytes arrive (``feed``), handing each item to ``on_item`` as soon as it is complete;
    ``close`` checks the end and returns the list's metadata. ``applied`` sums what
    ``on_item`` returned.

    Why not ``json.loads`` the body: a list from the watch cache is not paged (it ignores
    ``limit``): 50k Pods are one body of some 200 MB, which would decode to gigabytes of
    small objects. Even a page of 500 Pods decodes to 20 MB, alive until its last item is
    applied, with the index's long-lived objects allocated among them, so the allocator's
    arenas stay pinned when the page is freed (30 MB of RSS at 50k Pods). Decoding one item
    at a time keeps the garbage to one object and the buffer to one chunk plus one item.
    Raises ValueError for anything that is not such a list.
    """

    def __init__(self, on_item: Callable[[Any], int]) -> None:
        self.on_item = on_item
        self.applied = 0
        self.metadata: dict[str, Any] = {}
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._text = ""
        self._position = 0
        self._state = _START
        self._key = ""

    def feed(self, data: bytes) -> None:
        self._add(self._decoder.decode(data), final=False)

    def close(self) -> dict[str, Any]:
        self._add(self._decoder.decode(b"", final=True), final=True)
        if self._state != _DONE:
            raise ValueError("the list response ended early")
        return self.metadata

    def _add(self, text: str, final: bool) -> None:
        if self._position:
            self._text = self._text[self._position :] + text
            self._position = 0
        else:
            self._text += text
        self._parse(final)
        if len(self._text) - self._position > MAX_PENDING:
            raise ValueError(f"an unreadable list response (over {MAX_PENDING} bytes without a complete item)")

    def _parse(self, final: bool) -> None:
        text = self._text
        end = len(text)
        position = self._position
        while True:
            position = _skip(text, position)
            self._position = position
            if position >= end:
                return
            state = self._state
            char = text[position]
            if state == _START:
                if char != "{":
                    raise ValueError("the list response is not a JSON object")
                position += 1
                self._state = _FIRST_KEY
            elif state in (_FIRST_KEY, _KEY):
                if char == "}" and state == _FIRST_KEY:
                    position += 1
                    self._state = _DONE
                elif char == '"':
                    try:
                        self._key, position = json.decoder.scanstring(text, position + 1)
                    except json.JSONDecodeError:
                        if final:
                            raise ValueError(f"malformed list response at offset {position}") from None
                        return
                    self._state = _COLON
                else:
                    raise ValueError(f"malformed list response at offset {position}")
            elif state == _COLON:
                if char != ":":
                    raise ValueError(f"malformed list response at offset {position}")
                position += 1
                self._state = _VALUE
            elif state == _VALUE:
                if self._key == "items" and char == "[":
                    position += 1
                    self._state = _FIRST_ITEM
                else:
                    value, position = self._value(text, position, final)
                    if value is _INCOMPLETE:
                        return
                    if self._key == "metadata" and isinstance(value, dict):
                        self.metadata = value
                    self._state = _AFTER_VALUE
            elif state in (_FIRST_ITEM, _ITEM):
                if char == "]" and state == _FIRST_ITEM:
                    position += 1
                    self._state = _AFTER_VALUE
                else:
                    item, position = self._value(text, position, final)
                    if item is _INCOMPLETE:
                        return
                    self._state = _AFTER_ITEM
                    self._position = position
                    self.applied += self.on_item(item)
                    del item
            elif state == _AFTER_ITEM:
                if char == ",":
                    self._state = _ITEM
                elif char == "]":
                    self._state = _AFTER_VALUE
                else:
                    raise ValueError(f"malformed list items at offset {position}")
                position += 1
            elif state == _AFTER_VALUE:
                if char == ",":
                    self._state = _KEY
                elif char == "}":
                    self._state = _DONE
                else:
                    raise ValueError(f"malformed list response at offset {position}")
                position += 1
            else:
                raise ValueError(f"data after the end of the list response at offset {position}")

    @staticmethod
    def _value(text: str, position: int, final: bool) -> tuple[Any, int]:
        """The JSON value at ``position`` and the position after it; ``_INCOMPLETE`` when
        it may go on in data not yet received."""
        try:
            value, after = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            if final:
                raise ValueError(f"malformed list response: {exc}") from None
            return _INCOMPLETE, position
        # A number that ends where the data does may have more digits to come.
        if not final and after >= len(text) and text[after - 1] not in '}]"el':
            return _INCOMPLETE, position
        return value, after


def parse_list(text: str, on_item: Callable[[Any], int]) -> tuple[dict[str, Any], int]:
    """A whole list response at once (see ``ListReader``): its metadata and the sum of what
    ``on_item`` returned."""
    reader = ListReader(on_item)
    reader._add(text, final=True)
    return reader.close(), reader.applied


def _load_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _load_trim() if sys.platform.startswith("linux") else None


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system after a full list.

    Response chunks and decoded text come from glibc's heap; after the list the heap is
    mostly free but not returned: about 10 MB of RSS at 50k Pods. ``malloc_trim`` returns
    it in a millisecond; it runs once per full list.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a chunk of a list is decoded and applied.

    Decoding a chunk creates thousands of containers; each burst triggers collections that
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
        #: Spaces relists that come too fast (a server answering every watch with 410).
        self.relist_backoff = Backoff()
        #: Where to resume: the resourceVersion of the last list, event or bookmark applied
        #: (kept here, not in a local, so a watch that breaks off still advanced it).
        #: None: list first.
        self.version: str | None = None
        #: The resourceVersion the next list asks for: "0" (the watch cache) at first, then
        #: the last one seen; "" (a consistent read) after the server could not serve one.
        self.list_version = "0"
        #: The server paged a list at "0": it has no watch cache, so relists page too.
        self.paged = False
        self._list_started: float | None = None
        self._bad: tuple[str | None, int] = (None, 0)  # (version, failures) on unreadable watch data
        self._failing = False  # inside a streak of failures (log the first one only)
        self._warned_at = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            generation = self.source.generation
            try:
                if self.version is None:
                    self.version = await self._list()
                    self._recovered()
                    if not self.listed.is_set():
                        self.listed.set()
                        self.source.kind_listed()
                await self._watch(self.version)
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                self.source.relists.inc((self.kind,))
                self._relist_soon(f"resource version expired ({exc})")
                await self._pause_before_relist(loop)
            except BadData as exc:
                version, failures = self._bad
                failures = failures + 1 if version == self.version else 1
                self._bad = (self.version, failures)
                if failures >= BAD_EVENT_LIMIT:
                    self.source.relists.inc((self.kind,))
                    self._bad = (None, 0)
                    self._relist_soon(f"the watch from {self.version} failed {failures} times on bad data ({exc})")
                    await self._pause_before_relist(loop)
                else:
                    await self._retry(exc)
            except Exception as exc:  # the API server is down or misbehaving: retry, keep the index
                if generation != self.source.generation and not isinstance(exc, ApiError):
                    # The client was rebuilt (new TLS files) and its old connections closed.
                    log.debug("%s: the connection closed as the client was rebuilt; resuming", self.kind)
                    continue
                await self._retry(exc)

    async def _retry(self, error: Exception) -> None:
        self.source.restarts.inc((self.kind,))
        delay = self.backoff.next()
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            delay = max(delay, min(retry_after, RETRY_AFTER_MAX))
        self._failed(error, delay)
        await asyncio.sleep(delay)

    def _relist_soon(self, reason: str) -> None:
        log.info("%s: %s; listing again", self.kind, reason)
        if self.version is not None:
            self.list_version = self.version
        self.version = None

    async def _pause_before_relist(self, loop: asyncio.AbstractEventLoop) -> None:
        """A relist needed again soon after the previous list started waits a growing delay
        (client-go backs off the same way): a list succeeds, its watch gets 410 at once,
        and so on, must not become a loop of full lists."""
        started = self._list_started
        if started is None or loop.time() - started >= RELIST_GUARD:
            self.relist_backoff.reset()
            return
        delay = self.relist_backoff.next()
        log.info("%s: relisting again within %gs of the last list: listing in %.2fs", self.kind, RELIST_GUARD, delay)
        await asyncio.sleep(delay)

    # -- list ----------------------------------------------------------------------------------

    async def _list(self) -> str:
        """Apply a full list; its resourceVersion, the point to watch from."""
        self._list_started = asyncio.get_running_loop().time()
        version = self.list_version
        try:
            listed = await self._list_at(version)
        except ApiError as exc:
            if version == "" or isinstance(exc, ExpiredContinue) or not _version_unavailable(exc):
                raise
            # The server no longer has (or not yet has) that version: a consistent read now.
            log.info("%s: cannot list at resource version %s (%s); listing the latest", self.kind, version, exc)
            self.list_version = ""
            listed = await self._list_at("")
        self.list_version = listed
        return listed

    async def _list_at(self, version: str) -> str:
        index = self.source.index
        index.begin_list(self.kind)
        token: str | None = None
        count = 0
        while True:
            params: list[tuple[str, Any]] = [*self.resource.selectors()]
            paged = version in ("0", "") or self.paged
            if paged:
                params.append(("limit", PAGE_SIZE))
            if token:
                params.append(("continue", token))
            elif version == "0":
                params.append(("resourceVersion", "0"))
            elif version:
                params += [("resourceVersion", version), ("resourceVersionMatch", "NotOlderThan")]
            timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=LIST_READ_TIMEOUT)
            try:
                response = await self.source.get(self.resource.path, params, timeout)
            except Gone as exc:
                if token:  # the continue token outlived the server's history: the list again
                    raise ExpiredContinue(f"the list's continue token expired: {exc.message}") from None
                raise
            reader = ListReader(self._apply_added)
            try:
                async for chunk in response.content.iter_chunked(LIST_CHUNK):
                    with _no_gc():
                        reader.feed(chunk)
                    await asyncio.sleep(0)  # queries are answered between chunks
                with _no_gc():
                    metadata = reader.close()
            finally:
                response.release()
            count += reader.applied
            del reader
            self.backoff.reset()  # a page arrived: the server is back
            token = metadata.get("continue")
            if token and version == "0":
                self.paged = True  # a server without a watch cache: keep paging
            if not token:
                listed = metadata.get("resourceVersion")
                if not listed:
                    raise ValueError("the list response has no metadata.resourceVersion")
                index.end_list(self.kind)
                log.debug("%s: listed %d objects at resource version %s", self.kind, count, listed)
                _trim_heap()
                return str(listed)

    # -- watch ---------------------------------------------------------------------------------

    async def _watch(self, version: str) -> None:
        """Watch from ``version`` until the stream ends, advancing ``self.version``."""
        loop = asyncio.get_running_loop()
        seconds = int(WATCH_TIMEOUT * (1 + random.random()))
        params: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", seconds),
            *self.resource.selectors(),
        ]
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=WATCH_READ_TIMEOUT)
        started = loop.time()
        response = await self.source.get(self.resource.path, params, timeout)
        lines = 0
        try:
            content = response.content
            while True:
                try:
                    line = await content.readline()
                except TimeoutError:
                    # Not even a bookmark for that long: a connection that died without a
                    # word, or a server that sends none. Either way: watch again from here.
                    log.debug("%s: the watch was silent for %gs; watching again", self.kind, WATCH_READ_TIMEOUT)
                    return
                except ValueError as exc:  # aiohttp: a line over its limit
                    raise BadData(f"unreadable watch line: {exc}") from None
                if not line:
                    if not lines and loop.time() - started < SHORT_WATCH:
                        raise ShortWatch("the watch ended at once with no event")
                    return  # the server's timeout: watch again from self.version
                if line.strip():
                    lines += 1
                    self.version = self._event(line, self.version or version)
                    if self._failing or self.backoff.failures:
                        self.backoff.reset()
                        self._recovered()
        finally:
            response.close()

    def _event(self, line: bytes, version: str) -> str:
        """Apply one watch event; the resourceVersion to resume from after it."""
        try:
            event = json.loads(line)
        except ValueError:
            raise BadData(f"a watch line that is not JSON: {line[:200]!r}") from None
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise BadData(f"malformed watch event: {line[:200]!r}")
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
            if self.kind == "Namespace":
                wanted = metadata.get("name") in namespaces
            else:
                where = metadata.get("namespace")
                wanted = where in namespaces or (
                    self.kind == "Service" and (where, metadata.get("name")) == _DNS_SERVICE
                )
            if not wanted:
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
        now = asyncio.get_running_loop().time()
        # Once per outage; while not synced, again every few minutes (why a pod is unready).
        again = not self.source.index.synced and now - self._warned_at >= UNSYNCED_WARNING_INTERVAL
        if not self._failing or again:
            log.warning("%s: list/watch failed: %s; retrying in %.2fs", self.kind, text, delay)
            self._failing = True
            self._warned_at = now
        else:
            log.debug("%s: list/watch failed again: %s; retrying in %.2fs", self.kind, text, delay)

    def _recovered(self) -> None:
        if self._failing:
            log.info("%s: list/watch recovered", self.kind)
            self._failing = False


def _describe(error: BaseException) -> str:
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
            "Full lists of a Kubernetes kind after its first (410 Gone, unreadable watch data), per kind.",
        )
        self.reflectors: list[Reflector] = []
        #: Bumped each time the client is rebuilt (its old connections then close).
        self.generation = 0
        self._api: ApiClient | None = None
        self._configuration: Configuration | None = None
        self._tls: tuple[Any, ...] = ()
        self._lock = asyncio.Lock()  # one credentials refresh or client rebuild at a time
        self._refreshed_at = float("-inf")

    async def run(self) -> None:
        api, configuration = await self._connect()
        self._api, self._configuration = api, configuration
        self._tls = self.credentials.tls_files(configuration)
        self.reflectors = [Reflector(self, resource) for resource in resources(self.settings)]
        tasks = {self._start(reflector, 0.0): reflector for reflector in self.reflectors}
        try:
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    # A reflector never ends by itself: this is a bug. Keep the others going,
                    # and start this one again from a list (its state is unknown).
                    reflector = tasks.pop(task)
                    error = None if task.cancelled() else task.exception()
                    self.restarts.inc((reflector.kind,))
                    delay = reflector.backoff.next()
                    log.error(
                        "%s: the list/watch task ended (%s); starting it again in %.1fs",
                        reflector.kind,
                        _describe(error) if error is not None else "cancelled",
                        delay,
                        exc_info=error,
                    )
                    reflector.version = None
                    tasks[self._start(reflector, delay)] = reflector
        finally:
            try:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                # Even when cancelled again meanwhile: the session must not leak.
                api, self._api = self._api or api, None
                await _close_shielded(api)

    def _start(self, reflector: Reflector, delay: float) -> asyncio.Task[None]:
        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            await reflector.run()

        return asyncio.create_task(run(), name=f"kubernetes {reflector.kind} watch")

    def kind_listed(self) -> None:
        """A reflector finished its first list: synced once every kind has."""
        if not self.index.synced and all(reflector.listed.is_set() for reflector in self.reflectors):
            self.index.mark_synced()
            log.info("synced with the API server (%s)", self.credentials.description)

    async def _connect(self) -> tuple[ApiClient, Configuration]:
        """The client. Loading its configuration may fail (a kubeconfig's exec plugin, its
        certificates): retry with backoff, as for the API server itself."""
        backoff = Backoff()
        while True:
            try:
                configuration = await self.credentials.configuration()
                api = _client(configuration)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                reason = _describe(exc)
                log.warning("loading %s failed: %s; retrying in %.1fs", self.credentials.description, reason, delay)
                await asyncio.sleep(delay)
            else:
                return api, configuration

    async def _client(self) -> ApiClient:
        """The client, built again first if its TLS files changed (a rotated certificate)."""
        assert self._api is not None and self._configuration is not None
        if self.credentials.tls_files(self._configuration) == self._tls:
            return self._api
        async with self._lock:
            stamp = self.credentials.tls_files(self._configuration)
            if stamp != self._tls:
                fresh = _client(self._configuration)  # a file caught half-written raises: retried
                old, self._api, self._tls = self._api, fresh, stamp
                self.generation += 1
                log.info("the TLS files of %s changed: reconnecting with them", self.credentials.description)
                if old is not None:
                    await _close_shielded(old)
        assert self._api is not None
        return self._api

    async def get(self, path: str, params: list[tuple[str, Any]], timeout: aiohttp.ClientTimeout) -> Any:
        """GET ``path`` through kubernetes-asyncio's ApiClient (bearer token, TLS, headers),
        unparsed: the aiohttp response of a 200. Any other status raises ``Gone`` (410) or
        ``ApiError``, whichever way the client reports it: kubernetes-asyncio releases up
        to 36 return it, later ones raise ``ApiException`` even with ``_preload_content=False``."""
        api = await self._client()
        sent = asyncio.get_running_loop().time()
        try:
            response = await api.call_api(
                path,
                "GET",
                query_params=params,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except ApiException as exc:
            if not exc.status:  # a request it could not even make
                raise ApiError(0, _one_line(exc)) from None
            await self._failure(exc.status, exc.body, exc.reason, exc.headers, sent)
        if response.status != 200:
            try:
                body = await response.read()
            finally:
                response.release()
            await self._failure(response.status, body, response.reason, response.headers, sent)
        return response

    async def _failure(
        self, status: int, body: Any, reason: str | None, headers: Mapping[str, str] | None, sent: float
    ) -> NoReturn:
        """Raise for an error status, with the Status message the API server sent."""
        message = _status_message(body) or str(reason or "")
        if status == 410:
            raise Gone(message)
        if status == 401:
            await self._refresh(sent)
        raise ApiError(status, message, _retry_after(headers))

    async def _refresh(self, sent: float) -> None:
        """Read the credentials again after a 401, once for every request that got one
        (the reflectors of all kinds get their 401s together)."""
        if self._configuration is None:
            return
        async with self._lock:
            if self._refreshed_at > sent:
                return  # another request's 401 refreshed them after this one was sent
            await self.credentials.refresh(self._configuration)
            self._refreshed_at = asyncio.get_running_loop().time()


def _client(configuration: Configuration) -> ApiClient:
    api = ApiClient(configuration)  # builds the TLS context from the files
    api.user_agent = f"corefile-resolver/{__version__}"
    return api


async def _close_shielded(api: ApiClient) -> None:
    """Close a client (its aiohttp session and connections), even if the caller is
    cancelled meanwhile."""
    closing = asyncio.ensure_future(api.close())
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        closing.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise


def _status_message(body: Any) -> str:
    """The message of a Kubernetes Status body (bytes or text), else its start."""
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", "replace")
    if not body:
        return ""
    try:
        decoded = json.loads(body)
    except ValueError:
        return _one_line(ValueError(str(body)[:200]))
    if isinstance(decoded, dict):
        return str(decoded.get("message") or decoded.get("reason") or "")
    return ""


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by the API server)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds > 0 else None


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
