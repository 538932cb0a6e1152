"""Remembered answers: a repeated UDP query is answered with one dict lookup.

A node-local cache hears the same few hundred questions over and over, and each comes
as the same bytes but for the ID. So a UDP listener keeps, for the bytes after the ID
of a query that its block's fast path (``resolver.server.fast_path``) answered, a
function that answers those bytes again (``Again``). A repeat skips the header checks,
the question parsing, the routing, the ``Request`` and the fast path's lookups: the
bytes being equal, every one of those would come out as it did the first time.

What may change between two repeats is not in the bytes, and each remembered function
checks it, or is told:

- the answering plugin's data (a cache entry that expired, was evicted or replaced):
  its ``replay`` returns None, the function returns False, and the server forgets it
  and takes the usual path;
- the chain (a reload swaps it; ``loop`` leaves it): the function checks that its
  block still runs the chain it was made for, and a reload clears every memo;
- TTLs: ``replay`` rewrites them as the answering plugin does on a hit.

The bookkeeping of the plugins in front (prometheus's counters, errors) is done by the
``Tally`` functions they handed out for that reply, so the metrics are the chain's.
Only UDP is remembered: a TCP query shares its connection's reads and writes with
others, and TCP already answers a pipelined batch per read.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from resolver.config import ServerBlock
from resolver.plugin import Handler

#: Called with a repeat of the query it was made for and the client's address: answers
#: it and returns True, or returns False (nothing sent, nothing counted) when it can no
#: longer answer.
Again = Callable[[bytes, Any], bool]
#: From the plugin that answered: the same answer again for the given query bytes (their
#: ID), counted as that plugin counts a hit; None once it no longer has that answer.
Replay = Callable[[bytes], bytes | None]
#: From a plugin in front: its bookkeeping for the same reply again, given the time taken.
Tally = Callable[[float], None]

MEMO_CAPACITY = 2048  # remembered queries per UDP listener: about 2.3 KB each
#: Larger answers are not remembered (each remembered answer holds a copy of its bytes):
#: the size every resolver asks for since DNS flag day 2020.
MAX_REMEMBERED = 1232


class Memo:
    """The remembered answers of one UDP listener, keyed by the query bytes after the ID.

    Bounded: once ``capacity`` entries are held, the next one empties it first. Dropping
    only the oldest would keep the popular entries, but a dict finds its oldest key by
    skipping the slots of every key deleted before it (microseconds once full), and an
    entry costs only one answer from the fast path to make again. A client cycling
    through random queries (EDNS cookies, random names) never grows it past its bound.
    """

    __slots__ = ("capacity", "table")

    def __init__(self, capacity: int = MEMO_CAPACITY) -> None:
        self.capacity = capacity
        #: The bytes after a query's ID -> its ``Again``. The listener reads it directly.
        self.table: dict[bytes, Again] = {}

    def __len__(self) -> int:
        return len(self.table)

    def remember(self, query: bytes, again: Again) -> None:
        table = self.table
        if len(table) >= self.capacity:
            if self.capacity <= 0:
                return
            table.clear()
        table[query[2:]] = again

    def disable(self) -> None:
        """Remember nothing from now on (a remembered function failed: see the server)."""
        self.capacity = 0
        self.table.clear()

    def forget(self, query: bytes) -> None:
        self.table.pop(query[2:], None)

    def clear(self) -> None:
        self.table.clear()


def again_function(
    block: ServerBlock, handler: Handler, replay: Replay, tallies: tuple[Tally, ...], send: Callable[[bytes, Any], None]
) -> Again:
    """The ``Again`` for one remembered answer of ``block`` while it runs ``handler``."""
    tally = _together(tallies)

    def again(data: bytes, client: Any) -> bool:
        if block.handler is not handler:
            return False
        started = perf_counter()
        answer = replay(data)
        if answer is None:
            return False
        tally(perf_counter() - started)
        send(answer, client)
        return True

    return again


def _together(tallies: tuple[Tally, ...]) -> Tally:
    """One call for every tally. The usual case is one (prometheus counts a cache hit;
    errors has nothing to do for it), called directly: a loop over a one-item tuple costs
    as much as the call it makes."""
    if len(tallies) == 1:
        return tallies[0]

    def every(elapsed: float) -> None:
        for tally in tallies:
            tally(elapsed)

    return every
