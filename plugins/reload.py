"""reload: serve a changed Corefile without a restart.

Syntax::

    reload [INTERVAL] [JITTER]

Every INTERVAL (default 30s, at least 2s), shifted once by a random amount within
JITTER (default 15s; 0, or at least 1s; at most half the interval) so that a fleet of
replicas does not reload in step, the Corefile is read and its SHA512 compared with the
running one. The hash is taken over the parsed Corefile (imports and environment
expanded; comments and layout ignored), as CoreDNS does. On a change the process
reloads: the new configuration is parsed, set up and started next to the old one,
queries switch over at once, and the old plugins stop after the queries they were
answering are done. A Corefile that fails to load is
logged, counted in ``coredns_reload_failed_total``, and tried again only when the file
changes again; the running configuration keeps serving. SIGUSR1 reloads at once whether
or not this plugin is used.

Log lines (CoreDNS's): ``[INFO] plugin/reload: Running configuration SHA512 = <hex>``
once a configuration serves (at start and after each reload that worked).
Metric: ``coredns_reload_version_info{hash,value}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from pathlib import Path

from resolver.config import Config, ServerBlock
from resolver.corefile import CorefileError, Directive, canonical, parse
from resolver.logs import plugin_logger
from resolver.plugin import Plugin, expect_args, parse_duration
from resolver.runtime import Runtime

log = plugin_logger("reload")

DEFAULT_INTERVAL = 30.0
DEFAULT_JITTER = 15.0
MIN_INTERVAL = 2.0
MIN_JITTER = 1.0


class Watcher:
    """The one Corefile watch of the process, however many blocks say ``reload``.

    Every ``reload`` instance registers while it runs; the watch runs while any is
    registered. A reload starts the new configuration's instances before the old ones
    stop, so the watch carries on across reloads and ends only when a configuration
    without ``reload`` takes over.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.instances: list[Reload] = []
        self.task: asyncio.Task[None] | None = None
        # The hash of the Corefile at the previous look. A reload is asked for when the file
        # differs from both this and the running configuration, so a broken file is tried
        # once, and again whenever it changes (a revert and a second try included).
        self.last_seen = ""
        self.announced: Config | None = None

    def register(self, instance: Reload) -> None:
        self.instances.append(instance)
        if not self.last_seen:
            self.last_seen = self.runtime.config_sha512 or (instance.config.sha512 if instance.config else "")
        if self.task is None and self.runtime.corefile is not None:
            self.task = asyncio.get_running_loop().create_task(self._watch(Path(self.runtime.corefile)))

    async def unregister(self, instance: Reload) -> None:
        if instance in self.instances:
            self.instances.remove(instance)
        if not self.instances and self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def _watch(self, path: Path) -> None:
        while self.instances:
            await asyncio.sleep(self.instances[-1].interval)  # the newest configuration's interval
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("cannot read %s: %s", path, exc)
                continue
            if self.should_reload(parsed_sha512(text, path)) and self.runtime.request_reload is not None:
                self.runtime.request_reload()

    def should_reload(self, sha512: str) -> bool:
        """Whether a Corefile with this hash, just read, calls for a reload."""
        if sha512 == self.last_seen:
            return False  # unchanged since the previous look (even if that reload failed)
        self.last_seen = sha512
        return sha512 != self.runtime.config_sha512


def parsed_sha512(text: str, path: Path) -> str:
    """The hash a configuration made from ``text`` would have (see ``corefile.canonical``).

    A file that does not parse gets a hash of its text, so that the reload is attempted
    and the error is logged and counted like any failed reload.
    """
    try:
        blocks = parse(text, str(path), directory=path.parent)
    except CorefileError:
        return hashlib.sha512(b"unparsable\n" + text.encode()).hexdigest()
    return hashlib.sha512(canonical(blocks).encode()).hexdigest()


class Reload(Plugin):
    name = "reload"

    def __init__(self, interval: float, runtime: Runtime, config: Config | None) -> None:
        self.interval = interval
        self.runtime = runtime
        self.config = config
        self.version = runtime.metrics.gauge(
            "coredns_reload_version_info",
            "A metric with a constant '1' value labeled by hash, and value.",
            ("hash", "value"),
        )

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Reload:
        if directive.block:
            raise directive.error("takes no block")
        args = expect_args(directive, 0, 2)
        interval = parse_duration(args[0], directive) if args else DEFAULT_INTERVAL
        if interval < MIN_INTERVAL:
            raise directive.error(f"interval value must be greater or equal to {MIN_INTERVAL:g}s")
        jitter = parse_duration(args[1], directive) if len(args) > 1 else DEFAULT_JITTER
        if 0 < jitter < MIN_JITTER:
            raise directive.error(f"jitter value must be 0 or greater or equal to {MIN_JITTER:g}s")
        jitter = min(jitter, interval / 2)
        return cls(interval + random.uniform(-jitter / 2, jitter / 2), block.runtime, block.config)

    def connect(self, block: ServerBlock) -> None:
        self.config = block.config  # setup ran before the Config object existed

    def announce(self) -> None:
        """Log and export the hash of the configuration this instance belongs to."""
        sha512 = self.config.sha512 if self.config is not None else ""
        log.info("Running configuration SHA512 = %s", sha512)
        self.version.values.clear()  # only the running configuration's hash is reported
        self.version.set(("sha512", sha512), 1)

    async def start(self) -> None:
        watcher = self.runtime.shared(self.name, lambda: Watcher(self.runtime))
        if self.runtime.corefile is None:
            log.warning("the Corefile was not read from a file (stdin): it cannot be watched for changes")
        watcher.register(self)

    async def serving(self) -> None:
        """Announce the configuration once it really serves (never one that failed to load)."""
        watcher = self.runtime.shared(self.name, lambda: Watcher(self.runtime))
        if watcher.announced is not self.config:
            watcher.announced = self.config
            self.announce()

    async def stop(self) -> None:
        await self.runtime.shared(self.name, lambda: Watcher(self.runtime)).unregister(self)
