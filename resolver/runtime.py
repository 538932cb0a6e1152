"""Process-wide services that outlive any one configuration.

A reload replaces every plugin instance, but some things belong to the process: the
counters of packets that never reached a plugin, the HTTP servers that health, ready and
metrics share, the path of the Corefile, and the way to ask for a reload. They live in
one ``Runtime`` that the server and every configuration it loads share, and a plugin
reaches it through its server block (``block.runtime``), never through a global.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from resolver.endpoints import HTTPEndpoints


@dataclass
class Stats:
    """Counters for packets that never reach a plugin (exported by the metrics plugin)."""

    dropped_short: int = 0  # shorter than a DNS header
    dropped_responses: int = 0  # QR set: never answer an answer (reflection loops)
    formerr: int = 0
    notimp: int = 0
    refused: int = 0  # no server block serves the zone
    panics: int = 0  # a plugin raised
    tcp_rejected: int = 0  # connections over the cap
    reloads_failed: int = 0


class Runtime:
    """What every configuration of one process shares."""

    def __init__(self, corefile: str | None = None) -> None:
        self.stats = Stats()
        self.http = HTTPEndpoints()
        #: Path of the main Corefile; None when it was read from stdin (no reload then).
        self.corefile = corefile
        #: Set by whoever can reload (the CLI); the reload plugin calls it on a change.
        self.request_reload: Callable[[], None] | None = None
        self.started = time.time()
