"""The plugins, and the one execution order they run in: this project's plugin.cfg.

Each directive's code is the module of the same name in this package. The order below
is CoreDNS's plugin.cfg order restricted to the plugins implemented here; a plugin added
later goes where CoreDNS has it, so Corefiles behave the same in both servers.
"""

ORDER: tuple[str, ...] = (
    "reload",
    "bind",
    "ready",
    "health",
    "prometheus",
    "errors",
    "log",
    "acl",
    "any",
    "loadbalance",
    "cache",
    "autopath",
    "hosts",
    "kubernetes",
    "loop",
    "forward",
    "erratic",
    "whoami",
)
