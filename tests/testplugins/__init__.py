"""Plugins that exist only for the tests, registered with the real ones they mix with.

The order follows the same rule as ``plugins.ORDER``; ``first`` and ``second`` come in
that order whatever order a Corefile names them in.
"""

ORDER: tuple[str, ...] = ("bind", "first", "second", "crash", "big", "slowstop", "erratic", "whoami", "report")
