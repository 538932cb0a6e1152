"""bind: listen only on the given addresses instead of every address.

Syntax::

    bind ADDRESS... [{
        except ADDRESS...
    }]

ADDRESS is an IPv4 or IPv6 address. The directive may be repeated; the addresses add up.
``except`` removes addresses from the list. A node-local cache binds its link-local
address plus the kube-dns service IP this way, and a laptop setup binds ``127.0.0.1``.

Interface names (CoreDNS's ``bind eth0``) are not accepted yet; they need the
interface's addresses, which arrive with the operational-plugins issue.
"""

from __future__ import annotations

import ipaddress

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
        addresses = [_address(text, directive) for text in expect_args(directive, 1)]
        excluded: set[str] = set()
        for option in directive.children:
            if option.name != "except":
                raise raise_unknown_option(directive, option)
            excluded.update(_address(text, option) for text in expect_args(option, 1))
        kept = [address for address in addresses if address not in excluded]
        if not kept:
            raise directive.error("every address is excluded by except")
        for address in kept:
            if address not in block.hosts:
                block.hosts.append(address)
        return cls(kept)


def _address(text: str, directive: Directive) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise directive.error(f'"{text}" is not an IP address (interface names are not supported yet)') from None
