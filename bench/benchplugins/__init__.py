"""Plugins used only by the benchmarks (not installed, not in the server's registry)."""

ORDER: tuple[str, ...] = ("bind", "static", "whoami")
