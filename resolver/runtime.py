"""Process-wide services that outlive any one configuration.

A reload replaces every plugin instance, but some things belong to the process: the
counters of packets that never reached a plugin, the HTTP servers that health, ready and
metrics share, the metric families (counters do not reset on reload, as in CoreDNS),
the path of the Corefile, and the way to ask for a reload. They live in
one ``Runtime`` that the server and every configuration it loads share, and a plugin
reaches it through its server block (``block.runtime``), never through a global.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from resolver.endpoints import HTTPEndpoints
from resolver.metrics import Metrics


@dataclass
class Stats:
    """Packets the core answers or drops itself, before any plugin (exported by prometheus)."""

    dropped_short: int = 0  # shorter than a DNS header
    dropped_responses: int = 0  # QR set: never answer an answer (reflection loops)
    formerr: int = 0
    notimp: int = 0
    refused: int = 0  # no server block serves the zone
    badvers: int = 0  # EDNS version above 0
    panics: int = 0  # a plugin raised
    tcp_rejected: int = 0  # connections over the cap
    reloads_failed: int = 0


T = TypeVar("T")


class Runtime:
    """What every configuration of one process shares."""

    def __init__(self, corefile: str | None = None) -> None:
        self.stats = Stats()
        self.http = HTTPEndpoints()
        self.metrics = Metrics()
        #: Path of the main Corefile; None when it was read from stdin (no reload then).
        self.corefile = corefile
        #: Set by whoever can reload (the CLI); the reload plugin calls it on a change.
        self.request_reload: Callable[[], None] | None = None
        #: Set by whoever runs the process (the CLI): a plugin that logged a fatal error
        #: (loop: a forwarding loop) calls it to stop the process with exit status 1.
        #: None: the plugin exits the process itself.
        self.fatal: Callable[[str], None] | None = None
        #: SHA512 of the parsed Corefile being served (``Config.sha512``), set by the
        #: server when a configuration takes over; reload compares the file against it.
        self.config_sha512 = ""
        self._shared: dict[str, Any] = {}

    def shared(self, key: str, factory: Callable[[], T]) -> T:
        """Process-wide state of one plugin kind (created on first use, kept across
        reloads): one reload watcher however many blocks say ``reload``, one readiness
        table per ``ready`` address. Key it by the plugin's name."""
        value = self._shared.get(key)
        if value is None:
            value = self._shared[key] = factory()
        return value  # type: ignore[no-any-return]
