"""reload: serve a changed Corefile without a restart.

Syntax::

    reload [INTERVAL] [JITTER]

Every INTERVAL (default 30s, at least 2s), shifted once by a random amount within
JITTER (default 15s, at least 1s, at most half the interval) so that a fleet of
replicas does not reload in step, the Corefile is read and its SHA512 compared with the
running one. On a change the process reloads: the new configuration is parsed, set up
and started next to the old one, queries switch over at once, and the old plugins stop
after the queries they were answering are done. A Corefile that fails to load is
logged, counted in ``coredns_reload_failed_total``, and not retried until it changes
again; the running configuration keeps serving. SIGUSR1 reloads at once whether or not
this plugin is used. Only the Corefile itself is hashed (as in CoreDNS): a change in an
imported file alone is picked up at the next change of the Corefile or by SIGUSR1.

Log lines (CoreDNS's): ``[INFO] plugin/reload: Running configuration SHA512 = <hex>``
at start and after each reload. Metric: ``coredns_reload_version_info{hash,value}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from pathlib import Path

from resolver.config import Config, ServerBlock
from resolver.corefile import Directive
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
        self.failed_sha512 = ""  # a broken Corefile is tried once, then not until it changes

    def register(self, instance: Reload) -> None:
        if not any(other.config is instance.config for other in self.instances):
            instance.announce()
        self.instances.append(instance)
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
            sha512 = hashlib.sha512(text.encode()).hexdigest()
            if sha512 in (self.runtime.config_sha512, self.failed_sha512):
                continue
            # Remembered in case the reload fails; a reload that works changes
            # config_sha512 to this value, so either way it is not tried again.
            self.failed_sha512 = sha512
            if self.runtime.request_reload is not None:
                self.runtime.request_reload()


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
        if jitter < MIN_JITTER:
            raise directive.error(f"jitter value must be greater or equal to {MIN_JITTER:g}s")
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

    async def stop(self) -> None:
        await self.runtime.shared(self.name, lambda: Watcher(self.runtime)).unregister(self)
