"""bind: listen only on the given addresses instead of every address.

Syntax::

    bind ADDRESS... [{
        except ADDRESS...
    }]

ADDRESS is an IPv4 or IPv6 address, or a network interface name standing for every
address that interface has when the Corefile is loaded (IPv6 link-local ones with their
``%iface`` scope). The directive may be repeated; the addresses add up. ``except``
removes addresses from the list. A node-local cache binds its link-local address plus
the kube-dns service IP this way, and a laptop setup binds ``127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
import socket

from resolver.config import ServerBlock
from resolver.corefile import Directive
from resolver.plugin import Plugin, expect_args, raise_unknown_option


class Bind(Plugin):
    name = "bind"
    repeatable = True

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    @classmethod
    def setup(cls, directive: Directive, block: ServerBlock) -> Bind:
        addresses = [address for text in expect_args(directive, 1) for address in _addresses(text, directive)]
        excluded: set[str] = set()
        for option in directive.children:
            if option.name != "except":
                raise raise_unknown_option(directive, option)
            excluded.update(address for text in expect_args(option, 1) for address in _addresses(text, option))
        kept = [address for address in addresses if address not in excluded]
        if not kept:
            raise directive.error("every address is excluded by except")
        for address in kept:
            if address not in block.hosts:
                block.hosts.append(address)
        return cls(kept)


def _addresses(text: str, directive: Directive) -> list[str]:
    """An IP address as itself, or an interface name as all of its addresses."""
    try:
        return [str(ipaddress.ip_address(text))]
    except ValueError:
        pass
    interfaces = _interface_addresses()
    if text not in interfaces:
        known = ", ".join(sorted(interfaces)) or "none found"
        raise directive.error(f'"{text}" is neither an IP address nor a network interface (interfaces: {known})')
    if not interfaces[text]:
        raise directive.error(f'interface "{text}" has no IP addresses')
    return interfaces[text]


def _interface_addresses() -> dict[str, list[str]]:
    """Every interface's IPv4 and IPv6 addresses (all of them, secondary ones included).

    psutil is imported here only: a Corefile that binds addresses never loads it.
    """
    import psutil

    result: dict[str, list[str]] = {}
    for name, entries in psutil.net_if_addrs().items():
        found = result.setdefault(name, [])
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                address = entry.address
                if "%" not in address and address.lower().startswith("fe80:"):
                    address = f"{address}%{name}"  # link-local needs its scope to be bound
                found.append(address)
    return result
