"""The cache's entries, the per-name groups that keep A and AAAA consistent, and eviction.

Layout, chosen for the hit path:

* ``tables[variant]`` is a plain dict from the question's bytes (name lower-cased, then
  QTYPE and QCLASS) to an ``Entry``; ``variant`` packs the CD bit, the DO bit and whether
  the query had EDNS. A hit is one list index and one dict lookup.
* Every entry also belongs to a ``Group``: all entries of one owner name (every type and
  variant). Groups make the consistency rules cheap: a fresh NXDOMAIN removes the name's
  NOERROR entries, a fresh NOERROR removes its NXDOMAIN entries (RFC 8020), and an A entry
  and its AAAA sibling share one expiry (the earlier of the two), so both are refilled
  from upstream together.
* A name for which upstream gave a client-specific answer (autopath) becomes *dependent*
  for a while: its shared group is dropped and every client gets a private group keyed
  by its address, used for every type of that name. A client therefore never mixes a
  shared answer with one that was made for it, and never sees one made for someone else.
* Capacity is counted per kind (success, denial); a full kind evicts a random entry of
  that kind, as CoreDNS does, and that entry's A/AAAA sibling with it.
"""

from __future__ import annotations

import random

from resolver import wire

SUCCESS = 0
DENIAL = 1
KIND_NAMES = ("success", "denial")

TYPE_A = 1
TYPE_AAAA = 28
_SIBLING_TYPE = {TYPE_A: b"\x00\x1c", TYPE_AAAA: b"\x00\x01"}


class Entry:
    """One cached reply: the packed bytes around the question, and when it expires."""

    __slots__ = (
        "duration",
        "expires",
        "group",
        "heads",
        "hits",
        "kind",
        "last",
        "lifetime",
        "live",
        "offsets",
        "qkey",
        "qtype",
        "rcode",
        "refreshing",
        "slot",
        "stamp",
        "tail",
        "variant",
        "written",
    )

    def __init__(
        self,
        qkey: bytes,
        variant: int,
        qtype: int,
        rcode: int,
        kind: int,
        heads: tuple[bytes, bytes, bytes, bytes],
        tail: bytes,
        offsets: tuple[int, ...],
        expires: int,
        duration: int,
    ) -> None:
        self.qkey = qkey
        self.variant = variant
        self.qtype = qtype
        self.rcode = rcode
        self.kind = kind
        #: Header bytes 2..12 (flags and counts) for each (client RD, client AD) pair.
        self.heads = heads
        #: Everything after the question, TTLs as written at ``stamp``.
        self.tail = tail
        self.offsets = offsets  # TTL field offsets within ``tail``
        self.stamp = -1  # the second the TTLs in ``tail`` were written for; -1: rewrite
        self.written = -1  # the TTL every record in ``tail`` has (-1: not one TTL, or unknown)
        self.expires = expires
        self.duration = duration  # the TTL it was stored with (keepttl)
        self.lifetime = duration  # seconds it really lives once stored (align may cut it): prefetch
        self.hits = 0  # prefetch popularity: hits without a gap of DURATION
        self.last = 0
        self.refreshing = False  # a background refresh is in flight (at most one)
        self.live = False  # in the store; False once removed or replaced
        self.group: Group | None = None
        self.slot = -1  # index in the store's list of entries of this kind

    @property
    def name(self) -> bytes:
        return self.qkey[:-4]

    def sibling_key(self) -> bytes | None:
        """The AAAA key of an A entry and the reverse; None for other types."""
        qtype = _SIBLING_TYPE.get(self.qtype)
        if qtype is None:
            return None
        return self.qkey[:-4] + qtype + self.qkey[-2:]

    def __repr__(self) -> str:
        return f"<Entry {self.qkey!r} v{self.variant} rcode={self.rcode} expires={self.expires}>"


class Group:
    """The entries of one owner name: shared (``client`` None) or private to one client."""

    __slots__ = ("client", "entries", "name")

    def __init__(self, name: bytes, client: str | None) -> None:
        self.name = name
        self.client = client
        self.entries: dict[tuple[int, bytes], Entry] = {}


class Dependent:
    """A name whose answers depend on the client, until ``until``; one group per client."""

    __slots__ = ("groups", "until")

    def __init__(self, until: int) -> None:
        self.until = until
        self.groups: dict[str, Group] = {}


class Store:
    def __init__(self, success_capacity: int, denial_capacity: int, rng: random.Random | None = None) -> None:
        self.tables: list[dict[bytes, Entry]] = [{} for _ in range(8)]
        self.groups: dict[bytes, Group] = {}
        self.dependent: dict[bytes, Dependent] = {}
        self.kinds: tuple[list[Entry], list[Entry]] = ([], [])
        self.capacity = (success_capacity, denial_capacity)
        self._sweep_floor = 2 * (success_capacity + denial_capacity)
        self._sweep_at = self._sweep_floor  # dependent-name count that triggers a sweep
        self.random = rng or random.Random()

    def __len__(self) -> int:
        return len(self.kinds[SUCCESS]) + len(self.kinds[DENIAL])

    # -- finding groups --------------------------------------------------------------

    def group(self, name: bytes, client: str | None) -> Group | None:
        if client is None:
            return self.groups.get(name)
        dependent = self.dependent.get(name)
        return dependent.groups.get(client) if dependent is not None else None

    def view(self, name: bytes, client: str, now: int) -> Group | None:
        """The group whose entries ``client`` is answered from for ``name``."""
        dependent = self.dependent.get(name)
        if dependent is None:
            return self.groups.get(name)
        if dependent.until <= now:
            self.lapse(name)
            return None
        return dependent.groups.get(client)

    def target(self, name: bytes, client: str, client_specific: bool, now: int, lifetime: int) -> str | None:
        """Where a fresh answer for ``name`` to ``client`` belongs: the client's address
        (a private group) or None (shared). A client-specific answer makes the name
        dependent for ``lifetime`` seconds, dropping its shared entries."""
        dependent = self.dependent.get(name)
        if dependent is not None and dependent.until <= now:
            self.lapse(name)
            dependent = None
        if client_specific:
            if dependent is None:
                if len(self.dependent) >= self._sweep_at:
                    self._sweep_dependent(now)
                dependent = self.dependent[name] = Dependent(now + lifetime)
                shared = self.groups.get(name)
                if shared is not None:
                    for entry in list(shared.entries.values()):
                        self.remove(entry)
            dependent.until = max(dependent.until, now + lifetime)
        return client if dependent is not None else None

    def hold(self, name: bytes, until: int) -> None:
        """Keep ``name`` dependent until at least ``until``: as long as the client-specific
        entry just stored may be served (stale included). Only that long: a window as long
        as the longest TTL the cache allows let random names from one client pile up
        (each costs a table slot) for an hour; once the window lapses the private groups
        are dropped whole, so a shorter window never mixes shared and private answers."""
        dependent = self.dependent.get(name)
        if dependent is not None and dependent.until < until:
            dependent.until = until

    def _sweep_dependent(self, now: int) -> None:
        """Forget names whose dependent window ended and that hold no entries; sweep again
        only once the table has doubled, so the cost per new name stays constant."""
        for name in [name for name, item in self.dependent.items() if item.until <= now and not item.groups]:
            del self.dependent[name]
        self._sweep_at = max(self._sweep_floor, 2 * len(self.dependent))

    def lapse(self, name: bytes) -> None:
        """The name is no longer dependent: drop its private groups (the shared one is empty)."""
        dependent = self.dependent.pop(name, None)
        if dependent is not None:
            for group in list(dependent.groups.values()):
                for entry in list(group.entries.values()):
                    self.remove(entry)

    # -- adding and removing ---------------------------------------------------------

    def add(self, entry: Entry, client: str | None) -> list[Entry]:
        """Store ``entry`` (replacing one with the same key); returns the entries evicted.
        Once full, a random entry of the same kind goes (with its A/AAAA sibling), as
        CoreDNS evicts: no recency bookkeeping on the hit path."""
        qkey = entry.qkey
        name = qkey[:-4]
        key = (entry.variant, qkey)
        group = self.group(name, client)
        if group is not None:
            old = group.entries.get(key)
            if old is not None:
                self.remove(old)
        evicted: list[Entry] = []
        kind = self.kinds[entry.kind]
        capacity = self.capacity[entry.kind]
        while len(kind) >= capacity and kind:
            victim = kind[int(self.random.random() * len(kind))]
            evicted.append(victim)
            group = victim.group
            self.remove(victim)
            if group is not None and group.entries:  # its name has more: an A/AAAA sibling goes too
                sibling = self.sibling(victim)
                if sibling is not None:
                    evicted.append(sibling)
                    self.remove(sibling)
        group = self._group_for(name, client)
        group.entries[key] = entry
        if client is None:
            self.tables[entry.variant][qkey] = entry
        entry.group = group
        entry.slot = len(kind)
        kind.append(entry)
        entry.live = True
        return evicted

    def remove(self, entry: Entry) -> None:
        if not entry.live:
            return
        entry.live = False
        group = entry.group
        assert group is not None
        key = (entry.variant, entry.qkey)
        if group.entries.get(key) is entry:
            del group.entries[key]
        if group.client is None:
            table = self.tables[entry.variant]
            if table.get(entry.qkey) is entry:
                del table[entry.qkey]
        if not group.entries:
            self._drop_group(group)
        kind = self.kinds[entry.kind]
        last = kind.pop()
        if last is not entry:
            kind[entry.slot] = last
            last.slot = entry.slot
        entry.slot = -1

    def _group_for(self, name: bytes, client: str | None) -> Group:
        if client is None:
            group = self.groups.get(name)
            if group is None:
                group = self.groups[name] = Group(name, None)
            return group
        dependent = self.dependent[name]
        group = dependent.groups.get(client)
        if group is None:
            group = dependent.groups[client] = Group(name, client)
        return group

    def _drop_group(self, group: Group) -> None:
        if group.client is None:
            if self.groups.get(group.name) is group:
                del self.groups[group.name]
            return
        dependent = self.dependent.get(group.name)
        if dependent is not None and dependent.groups.get(group.client) is group:
            del dependent.groups[group.client]
            # The name stays dependent until its window ends even with no entries left: a
            # shared answer stored meanwhile could reach a client whose answers are its own.
            # Empty, ended windows are swept in ``target`` (a name never asked again would
            # otherwise be remembered for good).

    # -- consistency -----------------------------------------------------------------

    def purge(self, name: bytes, client: str | None, rcode: int) -> None:
        """A fresh NXDOMAIN removes the name's NOERROR entries and a fresh NOERROR its
        NXDOMAIN entries, whatever their type: the name cannot both exist and not exist."""
        if rcode == wire.NXDOMAIN:
            conflicting = wire.NOERROR
        elif rcode == wire.NOERROR:
            conflicting = wire.NXDOMAIN
        else:
            return
        group = self.group(name, client)
        if group is None:
            return
        for entry in [entry for entry in group.entries.values() if entry.rcode == conflicting]:
            self.remove(entry)

    def sibling(self, entry: Entry) -> Entry | None:
        """The live AAAA entry of an A entry's name and variant, or the reverse."""
        key = entry.sibling_key()
        if key is None or entry.group is None:
            return None
        sibling = entry.group.entries.get((entry.variant, key))
        return sibling if sibling is not None and sibling.live else None

    def align(self, entry: Entry, now: int) -> None:
        """Give an A entry and its unexpired AAAA sibling (or the reverse) the earlier of
        their two expiry times, so that both are asked upstream again together."""
        if not entry.live:
            return
        sibling = self.sibling(entry)
        if sibling is None or sibling.expires <= now:
            return
        expires = min(entry.expires, sibling.expires)
        for item in (entry, sibling):
            if item.expires != expires:
                item.expires = expires
                item.lifetime = min(item.lifetime, max(expires - now, 0))
                item.stamp = -1
