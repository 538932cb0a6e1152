"""kubernetes: serve the Kubernetes DNS specification from the API, or from manifests.

Syntax (CoreDNS's, plus ``manifests`` and ``pods local``)::

    kubernetes [ZONES...] [{
        endpoint URL                 # API server (default: in-cluster, else kubeconfig)
        tls CERT KEY CACERT          # client certificate for endpoint
        kubeconfig FILE [CONTEXT]
        namespaces NAMESPACE...      # serve only these namespaces
        namespace_labels EXPRESSION  # serve only namespaces matching this selector
        labels EXPRESSION            # serve only Services/EndpointSlices matching it
        pods disabled|insecure|verified|local NODE
        endpoint_pod_names           # endpoint names from their pod's name
        ttl SECONDS                  # 0 to 3600, default 5
        noendpoints                  # no EndpointSlice watch: headless names fail
        fallthrough [ZONES...]
        ignore empty_service         # a service without ready endpoints is NXDOMAIN
        startup_timeout DURATION     # wait this long for the first sync (default 5s)
        manifests DIR                # read objects from YAML/JSON files, no cluster
    }]

ZONES default to the server block's zones. Answers are built in ``records.py`` from the
``Index`` a source fills: ``manifests.py`` when ``manifests`` is set, else ``api.py``
(which alone imports kubernetes_asyncio, so a manifests-only server never loads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from plugins.autopath import parse_search_path
from plugins.kubernetes.index import Index
from plugins.kubernetes.records import Answerer
from plugins.kubernetes.settings import POD_MODES, WATCHED_POD_MODES, Settings, parse_selector
from resolver.config import ServerBlock, zone_arguments
from resolver.corefile import CorefileError, Directive
from resolver.dnsnames import in_zone
from resolver.logs import plugin_logger
from resolver.plugin import Handler, Plugin, expect_args, parse_duration, raise_unknown_option
from resolver.reply import Reply
from resolver.request import Request

if TYPE_CHECKING:
    from resolver.metrics import GaugeVec, HistogramVec

log = plugin_logger("kubernetes")

RESOLV_CONF = "/etc/resolv.conf"
#: Delays before starting a failed source again: doubling from the first to the last.
SOURCE_RESTART_INITIAL = 1.0
SOURCE_RESTART_MAX = 60.0
#: CoreDNS's buckets for the programming latency: 1 ms doubling 20 times (about 9 min).
PROGRAMMING_BUCKETS = tuple(0.001 * 2**i for i in range(20))
_FLAGS = ("endpoint_pod_names", "noendpoints")


class Source(Protocol):
    """Fills an Index: list, mark_synced, then keep it current until cancelled."""

    async def run(self) -> None: ...


class Kubernetes(Plugin):
    name = "kubernetes"

    def __init__(self, settings: Settings, block: ServerBlock | None = None, directive: Directive | None = None):
        self.settings = settings
        self.block = block
        self.directive = directive
        self.search = _host_search()  # the host's resolv.conf search path, for autopath
        self.programming: HistogramVec | None = None
        self.index = Index(settings, on_programming=self._observe_programming)
        self.answerer = Answerer(self)
        self._task: asyncio.Task[None] | None = None
        self._counts: _ObjectCounts | None = None
        if block is not None:
            metrics = block.runtime.metrics
            self.programming = metrics.histogram(
                "coredns_kubernetes_dns_programming_duration_seconds",
                "Histogram of the time (in seconds) it took to program a dns instance.",
                ("service_kind",),
                PROGRAMMING_BUCKETS,
            )
            self._objects = metrics.gauge(
                "coredns_kubernetes_objects", "Kubernetes objects held by the kubernetes plugin.", ("kind",)
            )

    # -- setup -----------------------------------------------------------------------------

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Kubernetes:
        return cls(parse_settings(directive, block), block, directive)

    def connect(self, block: ServerBlock) -> None:
        self.block = block

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        source = self._source()
        if self.block is not None:
            self._counts = _ObjectCounts.of(self._objects)
            self._counts.plugins.append(self)
        self._task = asyncio.create_task(self._run(source), name="kubernetes source")
        timeout = self.settings.startup_timeout
        try:
            await asyncio.wait_for(self._wait_synced(), timeout)
        except TimeoutError:
            log.warning("starting server with unsynced Kubernetes API (waited %gs)", timeout)

    async def stop(self) -> None:
        counts, self._counts = self._counts, None
        if counts is not None:
            counts.leave(self)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def ready(self) -> bool:
        return self.index.synced

    def _source(self) -> Source:
        settings = self.settings
        if settings.manifests is not None:
            from plugins.kubernetes.manifests import manifests_source

            return manifests_source(settings, self.index)
        from plugins.kubernetes import api  # imports kubernetes_asyncio: only when needed

        metrics = self.block.runtime.metrics if self.block is not None else None
        try:
            return api.api_source(settings, self.index, metrics, self._corefile_dir())  # type: ignore[arg-type]
        except ValueError as exc:
            raise self._error(str(exc)) from None

    async def _run(self, source: Source) -> None:
        """Run the source until the plugin stops. A source never ends by itself; should one
        fail all the same (a bug), say so and start it again, with a growing delay: the
        index it fills must not silently freeze while ``ready`` says 200."""
        delay = SOURCE_RESTART_INITIAL
        while True:
            try:
                await source.run()
                problem = "ended"
            except asyncio.CancelledError:
                raise
            except Exception:
                problem = "failed"
                log.exception("the Kubernetes source failed")
            log.error("the Kubernetes source %s; starting it again in %gs", problem, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, SOURCE_RESTART_MAX)

    async def _wait_synced(self) -> None:
        # Polling is fine here: it runs once per start, for at most startup_timeout.
        while not self.index.synced:
            task = self._task
            if task is not None and task.done():
                return
            await asyncio.sleep(0.02)

    def _error(self, problem: str) -> CorefileError:
        directive = self.directive
        if directive is None:
            return CorefileError("Corefile", 0, f"kubernetes: {problem}")
        return directive.error(problem)

    def _corefile_dir(self) -> str:
        return _base_dir(self.block.file if self.block is not None else "")

    # -- metrics ---------------------------------------------------------------------------

    def _observe_programming(self, service_kind: str, seconds: float) -> None:
        if self.programming is not None:
            self.programming.observe((service_kind,), seconds)

    # -- serving ----------------------------------------------------------------------------

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        return await self.answerer.serve(req, next)

    # -- autopath -----------------------------------------------------------------------------

    def zone_of(self, qname: str) -> str | None:
        """The longest of this plugin's zones that holds ``qname``."""
        best = None
        for zone in self.settings.zones:
            if in_zone(qname, zone) and (best is None or len(zone) > len(best)):
                best = zone
        return best

    def autopath_search(self, req: Request) -> list[str] | None:
        """Search path of the pod that sent req (by req.remote_ip, Running pods only):
        ``["<ns>.svc.<zone>", "svc.<zone>", "<zone>", *host search, ""]``; None when the
        qname is not under this plugin's zones or the client is no known Running pod.
        Pods on the host network never count (their IP is their node's), and an IP that
        Running pods of several namespaces hold (being reused) gives no path: whichever
        we picked could be the wrong one (DESIGN.md failure #3)."""
        zone = self.zone_of(req.qname)
        if zone is None:
            return None
        namespaces = set(self.index.client_namespaces(req.remote_ip))
        if len(namespaces) != 1:
            return None
        suffix = "" if zone == "." else zone
        return [f"{namespaces.pop()}.svc.{suffix}", f"svc.{suffix}", zone, *self.search, ""]


class _ObjectCounts:
    """The ``coredns_kubernetes_objects`` values of every started kubernetes plugin that
    shares a metrics registry, summed: each server block's plugin holds its own index
    (one callback per plugin would have the last one hide the others). Across a reload,
    only the newest configuration's plugins count: the old ones run on until their
    queries are answered, and would count the same objects twice meanwhile."""

    def __init__(self, gauge: GaugeVec) -> None:
        self.gauge = gauge
        self.plugins: list[Kubernetes] = []

    @classmethod
    def of(cls, gauge: GaugeVec) -> _ObjectCounts:
        """The gauge's shared callback, registered on first use."""
        for owner in gauge.callbacks:
            if isinstance(owner, _ObjectCounts):
                return owner
        counts = cls(gauge)
        gauge.add_callback(counts, counts)
        return counts

    def leave(self, plugin: Kubernetes) -> None:
        if plugin in self.plugins:
            self.plugins.remove(plugin)
        if not self.plugins:
            self.gauge.remove_callback(self)

    def __call__(self) -> dict[tuple[str, ...], float]:
        if not self.plugins:
            return {}
        newest = _config_of(self.plugins[-1])
        total: dict[tuple[str, ...], float] = {}
        for plugin in self.plugins:
            if _config_of(plugin) is not newest:
                continue
            for kind, count in plugin.index.counts().items():
                total[(kind,)] = total.get((kind,), 0.0) + count
        return total


def _config_of(plugin: Kubernetes) -> object:
    return plugin.block.config if plugin.block is not None else None


# -- Corefile parsing ---------------------------------------------------------------------------


def parse_settings(directive: Directive, block: ServerBlock) -> Settings:
    """The stanza as Settings; anything wrong raises ``file:line: kubernetes: problem``."""
    zones = zone_arguments(directive.args, directive) if directive.args else list(block.zones)
    if all(_is_reverse(zone) for zone in zones):
        raise directive.error("non-reverse zone name must be used")
    settings = Settings(zones=zones)
    seen: dict[str, int] = {}
    for option in directive.children:
        if option.block is not None:
            raise option.error("takes no block")
        if option.name in seen and option.name in _ONCE:
            raise option.error(f"given twice (first at line {seen[option.name]})")
        seen.setdefault(option.name, option.line)
        parser = _OPTIONS.get(option.name)
        if parser is None:
            raise raise_unknown_option(directive, option)
        parser(option, settings, block)
    if settings.namespaces and settings.namespace_labels:
        raise directive.error("namespaces and namespace_labels cannot both be set")
    if settings.manifests is not None and (settings.endpoint or settings.tls or settings.kubeconfig):
        # Not an error: a Corefile may keep its cluster settings while run from files.
        log.warning(
            "%s:%d: kubernetes: manifests is set: endpoint, tls and kubeconfig are not used",
            directive.file,
            directive.line,
        )
    return settings


def _endpoint(option: Directive, settings: Settings, block: ServerBlock) -> None:
    args = expect_args(option, 1)
    if len(args) > 1:
        log.warning("Multiple endpoints have been deprecated, only the first specified endpoint '%s' is used", args[0])
    url = args[0]
    if "://" not in url:
        raise option.error(f'"{url}" is not a URL (want e.g. https://10.0.0.1:6443)')
    settings.endpoint = url


def _tls(option: Directive, settings: Settings, block: ServerBlock) -> None:
    cert, key, ca = expect_args(option, 3, 3)
    settings.tls = (_path(cert, block), _path(key, block), _path(ca, block))


def _kubeconfig(option: Directive, settings: Settings, block: ServerBlock) -> None:
    args = expect_args(option, 1, 2)
    settings.kubeconfig = (_path(args[0], block), args[1] if len(args) == 2 else None)


def _namespaces(option: Directive, settings: Settings, block: ServerBlock) -> None:
    for name in expect_args(option, 1):
        if name.lower() not in settings.namespaces:
            settings.namespaces.append(name.lower())


def _selector(option: Directive) -> str:
    text = " ".join(expect_args(option, 1))
    try:
        parse_selector(text)
    except ValueError as exc:
        raise option.error(f"unable to parse label selector value '{text}': {exc}") from None
    return text


def _namespace_labels(option: Directive, settings: Settings, block: ServerBlock) -> None:
    settings.namespace_labels = _selector(option)


def _labels(option: Directive, settings: Settings, block: ServerBlock) -> None:
    settings.labels = _selector(option)


def _pods(option: Directive, settings: Settings, block: ServerBlock) -> None:
    args = expect_args(option, 1, 2)
    mode = args[0]
    if mode not in POD_MODES:
        raise option.error(f"wrong value for pods: {mode}, must be one of: disabled, verified, insecure, local")
    if mode == "local":
        if len(args) != 2 or not args[1]:
            raise option.error("pods local needs the NODE name (e.g. pods local {$NODE_NAME})")
        settings.pods_node = args[1]
    elif len(args) != 1:
        raise option.error(f"pods {mode} takes no other argument, got {args[1]!r}")
    settings.pods = mode
    settings.watch_pods = mode in WATCHED_POD_MODES


def _flag(option: Directive, settings: Settings, block: ServerBlock) -> None:
    expect_args(option, 0, 0)
    setattr(settings, option.name, True)


def _ttl(option: Directive, settings: Settings, block: ServerBlock) -> None:
    (text,) = expect_args(option, 1, 1)
    try:
        ttl = int(text)
    except ValueError:
        raise option.error(f'"{text}" is not a number') from None
    if not 0 <= ttl <= 3600:
        raise option.error(f"ttl must be in range [0, 3600]: {ttl}")
    settings.ttl = ttl


def _fallthrough(option: Directive, settings: Settings, block: ServerBlock) -> None:
    settings.fallthrough = zone_arguments(option.args, option) if option.args else ["."]


def _ignore(option: Directive, settings: Settings, block: ServerBlock) -> None:
    (what,) = expect_args(option, 1, 1)
    if what != "empty_service":
        raise option.error(f"unable to parse ignore value: '{what}' (only empty_service)")
    settings.ignore_empty_service = True


def _startup_timeout(option: Directive, settings: Settings, block: ServerBlock) -> None:
    (text,) = expect_args(option, 1, 1)
    settings.startup_timeout = parse_duration(text, option)


def _manifests(option: Directive, settings: Settings, block: ServerBlock) -> None:
    (text,) = expect_args(option, 1, 1)
    path = _path(text, block)
    if not os.path.isdir(path):
        problem = "does not exist" if not os.path.exists(path) else "is not a directory"
        raise option.error(f"manifests directory {path} {problem}")
    settings.manifests = path


_OPTIONS: dict[str, Any] = {
    "endpoint": _endpoint,
    "tls": _tls,
    "kubeconfig": _kubeconfig,
    "namespaces": _namespaces,
    "namespace_labels": _namespace_labels,
    "labels": _labels,
    "pods": _pods,
    "endpoint_pod_names": _flag,
    "ttl": _ttl,
    "noendpoints": _flag,
    "fallthrough": _fallthrough,
    "ignore": _ignore,
    "startup_timeout": _startup_timeout,
    "manifests": _manifests,
}
#: Options that make no sense twice (CoreDNS silently keeps the last; we say so instead).
_ONCE = {"endpoint", "tls", "kubeconfig", "pods", "ttl", "startup_timeout", "manifests", "labels", "namespace_labels"}


def _is_reverse(zone: str) -> bool:
    return zone.endswith(("in-addr.arpa.", "ip6.arpa."))


def _base_dir(corefile: str) -> str:
    """The Corefile's directory (the working directory for stdin), as hosts reads paths."""
    return str(Path.cwd() if corefile in ("", "stdin") else Path(corefile).resolve().parent)


def _path(text: str, block: ServerBlock) -> str:
    """A path from the Corefile: absolute as given, else from the Corefile's directory."""
    if os.path.isabs(text):
        return text
    return os.path.join(_base_dir(block.file), text)


def _host_search() -> list[str]:
    """The search domains of the host's resolv.conf (final dot, lower case), as CoreDNS
    reads them at setup for autopath's tail. Read as autopath reads a resolv.conf (the
    last search/domain line wins, ``domain`` gives one domain); a word that is no domain
    name is left out with a warning (it is the node's file, not the Corefile, at fault)."""
    try:
        with open(RESOLV_CONF, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []

    def bad(number: int, word: str) -> None:
        log.warning("%s line %d: %r is no domain name: left out of the search path", RESOLV_CONF, number, word)

    # The root as a search domain is the bare name, which autopath tries last anyway.
    return [name for name in parse_search_path(lines, bad) if name != "."]
