"""The plugin contract, the registry, and helpers for parsing directive arguments.

A plugin is a class with a directive ``name`` that

* builds itself from its Corefile lines in ``setup`` (raising ``CorefileError`` through
  ``directive.error(...)`` for anything wrong, so the user gets ``file:line: problem``);
* may look up other plugins of its server block in ``connect`` (autopath finds
  kubernetes, ready asks everyone), after every plugin of the block exists;
* may do I/O in ``start``/``stop`` (watches, HTTP endpoints), once per configuration,
  and delay a shutdown in ``before_shutdown`` (lameduck);
* answers queries in ``serve(req, next)``: return a ``Reply``, or ``await next(req)`` to
  fall through, or wrap ``next`` to observe. Return ``None`` to send nothing at all.

The execution order is not the Corefile's: it is the one list in ``plugins.ORDER``
(this project's plugin.cfg), and a plugin module is imported only when a Corefile uses
its directive, so startup does not pay for plugins a configuration does not name.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from dnslib import DNSRecord

from resolver import wire
from resolver.corefile import CorefileError, Directive
from resolver.reply import Reply
from resolver.request import Request

if TYPE_CHECKING:
    from resolver.config import ServerBlock

Handler = Callable[[Request], Awaitable[Reply | None]]


class Plugin:
    """Base class of every plugin; subclasses set ``name`` and override what they need."""

    name: ClassVar[str] = ""
    #: May the directive appear more than once in one server block?
    repeatable: ClassVar[bool] = False
    #: False once the plugin has nothing left to do per query (loop, after its probe):
    #: ``ServerBlock.link`` then leaves it out. Set it, then call ``block.link()``.
    in_chain: bool = True

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Plugin:
        """Build the plugin from its Corefile line(s); the default accepts no arguments."""
        no_arguments(directive)
        return cls()

    def connect(self, block: ServerBlock) -> None:
        """Find the other plugins this one works with; may raise ``CorefileError``."""

    async def start(self) -> None:
        """Start background work (called once the whole configuration is set up)."""

    async def stop(self) -> None:
        """Stop background work (on shutdown, or when a reload replaces this config).

        After a reload this runs once the queries that were already in the old chain have
        been answered (or the shutdown grace period has passed).
        """

    async def serving(self) -> None:
        """Called once this plugin's configuration answers queries (after a reload's swap,
        so never for a configuration that failed to load): the place to announce it, or to
        send queries through the server itself (loop's probes)."""

    async def before_shutdown(self) -> None:
        """Called on SIGTERM while queries are still answered (health's lameduck waits here)."""

    def ready(self) -> bool | None:
        """Readiness for the ``ready`` plugin: None means this plugin does not report."""
        return None

    async def serve(self, req: Request, next: Handler) -> Reply | None:
        return await next(req)

    # -- helpers for building replies -------------------------------------------------

    def answer(self, message: DNSRecord, error: str | None = None) -> Reply:
        """Wrap a dnslib message as this plugin's reply."""
        return Reply(message, plugin=self.name, error=error)

    def fail(self, req: Request, rcode: int, error: str | None = None) -> Reply:
        """An empty reply with ``rcode`` (SERVFAIL, REFUSED, ...) written by this plugin."""
        return Reply(
            wire=wire.error_reply(req.wire, rcode, req.question.end, req.edns, req.do),
            plugin=self.name,
            error=error,
        )


class Registry:
    """Directive names in execution order, and the plugin class behind each."""

    def __init__(self, order: Sequence[str], package: str) -> None:
        if len(set(order)) != len(order):
            raise ValueError("a directive is listed twice in the plugin order")
        self.order = tuple(order)
        self.package = package
        self._position = {name: index for index, name in enumerate(self.order)}
        self._classes: dict[str, type[Plugin]] = {}

    @classmethod
    def default(cls) -> Registry:
        """The registry of the ``plugins`` package that ships with the server."""
        package = importlib.import_module("plugins")
        return cls(package.ORDER, "plugins")

    def __contains__(self, name: str) -> bool:
        return name in self._position

    def position(self, name: str) -> int:
        return self._position[name]

    def load(self, name: str) -> type[Plugin]:
        """The class for directive ``name``, importing its module on first use."""
        found = self._classes.get(name)
        if found is None:
            module = importlib.import_module(f"{self.package}.{name}")
            for value in vars(module).values():
                if isinstance(value, type) and issubclass(value, Plugin) and value.name == name:
                    found = value
                    break
            else:
                raise LookupError(f"module {module.__name__} defines no plugin named {name!r}")
            self._classes[name] = found
        return found

    def suggest(self, name: str) -> str | None:
        close = difflib.get_close_matches(name, self.order, n=1, cutoff=0.6)
        return close[0] if close else None


# -- argument helpers shared by plugins -------------------------------------------------


def no_arguments(directive: Directive) -> None:
    if directive.args:
        raise directive.error(f"takes no arguments, got {' '.join(directive.args)!r}")
    if directive.block:
        raise directive.error("takes no block")


def expect_args(directive: Directive, least: int, most: int | None = None) -> list[str]:
    """The directive's arguments, checked for count."""
    count = len(directive.args)
    if count < least or (most is not None and count > most):
        if most is None:
            wanted = f"at least {least}"
        elif least == most:
            wanted = f"exactly {least}"
        else:
            wanted = f"{least} to {most}"
        plural = "" if (most if most is not None else least) == 1 else "s"
        raise directive.error(f"expected {wanted} argument{plural}, got {count}")
    return directive.args


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, directive: Directive) -> float:
    """A Go-style duration (``30s``, ``1m30s``, ``500ms``) in seconds, as CoreDNS reads them."""
    if text == "0":
        return 0.0
    position = 0
    seconds = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or position == 0:
        raise directive.error(f'invalid duration "{text}" (use e.g. 30s, 500ms, 1m30s)')
    return seconds


def parse_int(text: str, directive: Directive, least: int = 0, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise directive.error(f'"{text}" is not a number') from None
    if value < least or (most is not None and value > most):
        bound = f"between {least} and {most}" if most is not None else f"at least {least}"
        raise directive.error(f"{value} is out of range: must be {bound}")
    return value


def raise_unknown_option(directive: Directive, option: Directive) -> CorefileError:
    """The error for an unknown line inside a plugin's block."""
    return CorefileError(option.file, option.line, f'{directive.name}: unknown option "{option.name}"')


def format_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` prints it: ``300ms``, ``30s``, ``5m0s``."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_decimal(ns, 3)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_decimal(ns, 6)}ms"
    whole_seconds, fraction = divmod(ns, 1_000_000_000)
    minutes, secs = divmod(whole_seconds, 60)
    hours, minutes = divmod(minutes, 60)
    text = _decimal(secs * 1_000_000_000 + fraction, 9) + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return sign + text


def _decimal(value: int, digits: int) -> str:
    """``value / 10**digits`` with the fraction's trailing zeros (and a bare point) dropped."""
    whole, fraction = divmod(value, 10**digits)
    if not fraction:
        return str(whole)
    return f"{whole}.{fraction:0{digits}d}".rstrip("0")
