"""HTTP servers shared by address, for health, ready and metrics.

CoreDNS lets several plugins and several server blocks name the same address (``health``
in two blocks, ``prometheus :9153`` everywhere); there must still be one listening
socket. Routes are added and removed while the server runs, so a reload can hand an
address from the old configuration to the new one without the port ever closing: the
new plugin adds its route before the old one removes its own.

aiohttp is imported only when an endpoint is first opened, so a Corefile without HTTP
plugins does not pay its import time at startup.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from resolver.corefile import Directive, port_number
from resolver.logs import quiet_http_errors

Handler = Callable[[Any], Awaitable[Any]]  # aiohttp.web.Request -> aiohttp.web.Response


def check_address(text: str, directive: Directive) -> str:
    """``HOST:PORT``, ``:PORT`` or ``[IPv6]:PORT`` as Go's net.SplitHostPort accepts it
    (CoreDNS rejects an address without a port); raises a one-line Corefile error."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise directive.error(f'invalid address "{text}": missing port (use HOST:PORT or :PORT)')
        port = rest[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise directive.error(f'invalid address "{text}": missing port (use HOST:PORT or :PORT)')
        if ":" in host:
            raise directive.error(f'invalid address "{text}": too many colons (write IPv6 as [ADDRESS]:PORT)')
    if port_number(port) is None:
        raise directive.error(f'invalid address "{text}": invalid port "{port}"')
    return text


class EndpointError(Exception):
    """The address cannot be served; the message names it and says why."""


@dataclass(eq=False)
class Route:
    address: str
    path: str
    handler: Handler
    port: int = 0  # the port actually bound (useful when the address asked for port 0)


@dataclass(eq=False)
class _Site:
    runner: Any
    port: int
    routes: dict[str, list[Route]] = field(default_factory=dict)


def split_address(address: str, default_port: int) -> tuple[str | None, int]:
    """``:8080``, ``localhost:9153``, ``[::1]:8181`` or a bare host -> (host, port).

    An empty host means every address (None for aiohttp).
    """
    host, port = address, ""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, port = address.split(":")
    elif address.count(":") > 1:
        host = address  # a bare IPv6 address
    number = port_number(port) if port else default_port
    if number is None:
        raise ValueError(f'invalid port in address "{address}"')
    return (host or None), number


class HTTPEndpoints:
    """One aiohttp server per address; routes come and go at runtime."""

    def __init__(self) -> None:
        self._sites: dict[str, _Site] = {}

    async def add(self, address: str, path: str, handler: Handler, default_port: int) -> Route:
        host, port = split_address(address, default_port)
        try:
            family, bind_host = bind_target(host, port)
        except OSError as exc:
            raise EndpointError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        # Keyed by what is bound, not by how it was written: "localhost:9153" and
        # "127.0.0.1:9153" (or ":9153" and "0.0.0.0:9153") are one site, so a reload that
        # only rewrites the address reuses the socket instead of failing to bind it twice.
        key = f"{bind_host}:{port}"
        site = self._sites.get(key)
        if site is None:
            site = await self._open(family, bind_host, port, address)
            self._sites[key] = site
        route = Route(key, path, handler, site.port)
        site.routes.setdefault(path, []).append(route)
        return route

    async def remove(self, route: Route) -> None:
        site = self._sites.get(route.address)
        if site is None:
            return
        stack = site.routes.get(route.path, [])
        if route in stack:
            stack.remove(route)
        if not stack:
            site.routes.pop(route.path, None)
        if not site.routes:
            del self._sites[route.address]
            await site.runner.cleanup()

    async def close(self) -> None:
        for site in list(self._sites.values()):
            await site.runner.cleanup()
        self._sites.clear()

    async def _open(self, family: socket.AddressFamily, bind_host: str, port: int, address: str) -> _Site:
        from aiohttp import web

        quiet_http_errors(logging.getLogger("aiohttp.server"))

        site_state: dict[str, _Site] = {}

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            routes = site_state["site"].routes.get(request.path)
            if not routes:
                return web.Response(status=404, text="404 page not found\n")
            return await routes[-1].handler(request)  # the newest configuration answers

        runner = web.ServerRunner(web.Server(dispatch, access_log=None), handle_signals=False)
        await runner.setup()
        try:
            sock = _bind(family, bind_host, port)
        except OSError as exc:
            await runner.cleanup()
            raise EndpointError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        tcp_site = web.SockSite(runner, sock)
        await tcp_site.start()
        site = _Site(runner, sock.getsockname()[1])
        site_state["site"] = site
        return site


WILDCARD = "*"


def bind_target(host: str | None, port: int) -> tuple[socket.AddressFamily, str]:
    """What to bind for a host: ``*`` for every address, else one IP address. A host name
    is resolved preferring IPv4, as Go's listener does, so ``localhost:9153`` is reachable
    on 127.0.0.1 even where ``/etc/hosts`` lists ``::1`` first."""
    if host in (None, "", "0.0.0.0", "::", "*"):
        return socket.AF_INET6, WILDCARD
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _type, _proto, _name, sockaddr = next((i for i in infos if i[0] == socket.AF_INET), infos[0])
    return family, str(sockaddr[0])


def _bind(family: socket.AddressFamily, bind_host: str, port: int) -> socket.socket:
    """A listening socket: dual-stack ``::`` for every address (IPv4 only if the host has
    no IPv6), else the address itself."""
    if bind_host == WILDCARD:
        try:
            return _listen(socket.AF_INET6, "::", port, dual_stack=True)
        except OSError:
            return _listen(socket.AF_INET, "0.0.0.0", port)
    return _listen(family, bind_host, port)


def _listen(family: socket.AddressFamily, host: str, port: int, dual_stack: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
