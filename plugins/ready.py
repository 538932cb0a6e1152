"""ready: an HTTP readiness endpoint that says whether every plugin is ready to serve.

Syntax::

    ready [ADDRESS] [{
        monitor until-ready|continuously
    }]

``GET http://ADDRESS/ready`` (default address ``:8181``) answers 200 ``OK`` once every
plugin that reports readiness (the kubernetes plugin, until its first sync) is ready,
and otherwise 503 with the names of the plugins that are not, sorted and comma
separated (``kubernetes``). While the process shuts down it answers 503
``Shutting down``, so traffic moves away during a lameduck period.

Every server block that names ``ready`` with the same ADDRESS has its plugins counted
on that one endpoint; blocks with ``ready`` on another address, or without ``ready``,
are not. With ``monitor until-ready`` (the default) a plugin that said it is ready is
not asked again for as long as the configuration runs; ``continuously`` asks on every
request, so a plugin can become not ready again. After a reload the new
configuration's plugins are the ones asked, from scratch.
"""

from __future__ import annotations

from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.endpoints import Route, check_address, split_address
from resolver.httpserver import HTTPRequest, Response
from resolver.logs import plugin_logger
from resolver.plugin import Plugin, expect_args, raise_unknown_option

log = plugin_logger("ready")

DEFAULT_ADDRESS = ":8181"
DEFAULT_PORT = 8181
PATH = "/ready"
MONITOR_TYPES = ("until-ready", "continuously")


class Board:
    """The plugins one /ready endpoint asks, for one configuration.

    Built once per (configuration, address) and shared by the ``ready`` instances of
    the blocks on that address, so whichever of their routes answers (the newest),
    it asks all of their blocks and remembers who was ready only once.
    """

    def __init__(self) -> None:
        # (plugin, keep asking after it said ready): only plugins that implement ready().
        self.asking: list[tuple[Plugin, bool]] = []
        self.shutting_down = False

    def add_block(self, block: ServerBlock, continuously: bool) -> None:
        for plugin in block.plugins:
            if type(plugin).ready is not Plugin.ready:  # the rest can never report
                self.asking.append((plugin, continuously))

    def not_ready(self) -> list[str]:
        """Names of the plugins not ready now, sorted and without repeats."""
        names: set[str] = set()
        still: list[tuple[Plugin, bool]] = []
        for plugin, continuously in self.asking:
            try:
                state = plugin.ready()
            except Exception:
                log.exception("%s: readiness check failed", plugin.name)
                state = False
            if state is False:
                names.add(plugin.name)
            if state is not True or continuously:
                still.append((plugin, continuously))
        self.asking = still
        return sorted(names)


class Ready(Plugin):
    name = "ready"

    def __init__(self, block: ServerBlock, address: str, continuously: bool) -> None:
        self.http = block.runtime.http
        self.address = address
        self.continuously = continuously
        host, port = split_address(address, DEFAULT_PORT)
        self.key = f"{host or ''}:{port}"  # as the HTTP endpoints key their servers
        self.board: Board | None = None
        self.route: Route | None = None

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Ready:
        args = expect_args(directive, 0, 1)
        address = check_address(args[0], directive) if args else DEFAULT_ADDRESS
        continuously = False
        for option in directive.children:
            if option.name != "monitor":
                raise raise_unknown_option(directive, option)
            if option.block:
                raise option.error("takes no block")
            mode = expect_args(option, 1, 1)[0]
            if mode not in MONITOR_TYPES:
                raise option.error(f'monitor type "{mode}" not supported (use until-ready or continuously)')
            continuously = mode == "continuously"
        return cls(block, address, continuously)

    def connect(self, block: ServerBlock) -> None:
        """Share one Board with every ``ready`` of this configuration on this address.

        Blocks connect in file order, so the first of them builds the board for all;
        the others find it on that first instance.
        """
        blocks = block.config.blocks if block.config is not None else [block]
        peers = [(other_block, other) for other_block in blocks for other in _ready_plugins(other_block)]
        peers = [(other_block, other) for other_block, other in peers if other.key == self.key]
        board = next((other.board for _block, other in peers if other.board is not None), None)
        if board is None:
            board = Board()
            for other_block, other in peers:
                board.add_block(other_block, other.continuously)
        self.board = board

    async def start(self) -> None:
        self.route = await self.http.add(self.address, PATH, self.handle, DEFAULT_PORT)

    async def stop(self) -> None:
        route, self.route = self.route, None
        if route is not None:
            await self.http.remove(route)

    async def before_shutdown(self) -> None:
        if self.board is not None:
            self.board.shutting_down = True

    async def handle(self, request: HTTPRequest) -> Response:
        board = self.board
        if board is None or board.shutting_down:
            return Response.text("Shutting down", 503)
        names = board.not_ready()
        if not names:
            return Response.text("OK")
        listed = ",".join(names)
        log.info('Plugins not ready: "%s"', listed)
        return Response.text(listed, 503)


def _ready_plugins(block: ServerBlock) -> list[Ready]:
    return [plugin for plugin in block.find_all(Ready.name) if isinstance(plugin, Ready)]
