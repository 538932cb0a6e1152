"""Plugins that exist only for the tests, registered with the real ones they mix with.

The order follows the same rule as ``plugins.ORDER``; ``first`` and ``second`` come in
that order whatever order a Corefile names them in. Modules that only re-export a real
plugin (bind, ready, health, errors, log, acl, loadbalance, erratic, whoami, kubernetes) let tests
mix real plugins with test-only ones in one chain.
"""

ORDER: tuple[str, ...] = (
    "bind",
    "ready",
    "health",
    "prometheus",
    "errors",
    "log",
    "first",
    "second",
    "acl",
    "loadbalance",
    "cache",
    "autopath",
    "searchpath",
    "scripted",
    "crash",
    "failing",
    "big",
    "manyrecords",
    "slowstop",
    "contexts",
    "kubernetes",
    "loop",
    "relay",
    "erratic",
    "notready",
    "whoami",
    "report",
)
