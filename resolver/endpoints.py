"""HTTP servers shared by address, for health, ready and metrics.

CoreDNS lets several plugins and several server blocks name the same address (``health``
in two blocks, ``prometheus :9153`` everywhere); there must still be one listening
socket. Routes are added and removed while the server runs, so a reload can hand an
address from the old configuration to the new one without the port ever closing: the
new plugin adds its route before the old one removes its own.

The HTTP itself is resolver.httpserver's: a small asyncio server for GET and HEAD, so
these endpoints cost the process no web framework.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from resolver.corefile import Directive, port_number
from resolver.httpserver import HTTPRequest, HTTPServer, Limits, Response

Handler = Callable[[HTTPRequest], Awaitable[Response]]
NOT_FOUND = "404 page not found\n"  # Go's text, as CoreDNS answers an unknown path


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
    port: int
    routes: dict[str, list[Route]] = field(default_factory=dict)
    server: HTTPServer = field(init=False)

    async def dispatch(self, request: HTTPRequest) -> Response:
        routes = self.routes.get(request.path)
        if not routes:
            return Response.text(NOT_FOUND, 404)
        return await routes[-1].handler(request)  # the newest configuration answers


def split_address(address: str, default_port: int) -> tuple[str | None, int]:
    """``:8080``, ``localhost:9153``, ``[::1]:8181`` or a bare host -> (host, port).

    An empty host means every address (None).
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
    """One HTTP server per address; routes come and go at runtime."""

    def __init__(self, limits: Limits | None = None) -> None:
        self._sites: dict[str, _Site] = {}
        self.limits = limits

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
            await site.server.close()

    def serves(self, route: Route) -> bool:
        """Whether this process answers ``route`` (a worker after the first of
        ``-workers`` accepts routes and serves none of them)."""
        site = self._sites.get(route.address)
        return site is not None and route in site.routes.get(route.path, ())

    async def close(self) -> None:
        sites = list(self._sites.values())
        self._sites.clear()
        for site in sites:
            await site.server.close()

    async def _open(self, family: socket.AddressFamily, bind_host: str, port: int, address: str) -> _Site:
        try:
            sock = _bind(family, bind_host, port)
        except OSError as exc:
            raise EndpointError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        site = _Site(sock.getsockname()[1])
        name = f"[{bind_host}]" if ":" in bind_host else "" if bind_host == WILDCARD else bind_host
        site.server = HTTPServer(site.dispatch, f"{name}:{site.port}", self.limits)
        try:
            await site.server.start(sock)
        except OSError as exc:
            sock.close()
            raise EndpointError(f"cannot listen on {address}: {exc.strerror or exc}") from None
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
