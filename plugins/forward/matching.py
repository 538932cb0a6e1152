"""What every upstream exchange shares: the random message ID, the test that a reply
answers our query, and errors worded as CoreDNS (Go) words them."""

from __future__ import annotations

import os
import socket
from typing import Any

_QR = 0x80
_QUESTIONLESS_RCODES = frozenset((1, 2, 4, 5))


class UpstreamError(Exception):
    """An attempt failed; the text reads like CoreDNS's (Go's) error, for the errors plugin."""


def mismatch(reply: bytes, query: bytes, qend: int) -> str | None:
    """Why ``reply`` is not the answer to ``query`` (None when it is).

    The question must be ours: same name ignoring ASCII case, same type and class. Only
    the name is lower-cased: QTYPE 65 is the byte 0x41, an "A".
    """
    if len(reply) < 12 or not reply[2] & _QR:
        return "malformed"
    if reply[:2] != query[:2]:
        return "id"
    count = reply[4:6]
    if count == b"\x00\x00" and reply[3] & 0x0F in _QUESTIONLESS_RCODES:
        return None  # FORMERR/NOTIMP/SERVFAIL/REFUSED may come without a question (RFC 6891 7)
    if len(reply) < qend:
        return "malformed"
    if count != b"\x00\x01":
        return "question"
    if reply[12:qend] == query[12:qend]:
        return None  # the usual case: the very bytes we sent
    name_end = qend - 4
    if reply[name_end:qend] != query[name_end:qend] or reply[12:name_end].lower() != query[12:name_end].lower():
        return "question"
    return None


_random_bytes = b""
_random_offset = 0


def new_id() -> bytes:
    """A random 16-bit message ID from the OS's CSPRNG (read 4 KiB at a time: one
    ``getrandom`` call per query costs a microsecond)."""
    global _random_bytes, _random_offset
    if _random_offset >= len(_random_bytes):
        _random_bytes, _random_offset = os.urandom(4096), 0
    _random_offset += 2
    return _random_bytes[_random_offset - 2 : _random_offset]


def _forget_random_bytes() -> None:
    """In a forked child: never hand out the IDs the parent's buffer would give too."""
    global _random_bytes, _random_offset
    _random_bytes, _random_offset = b"", 0


os.register_at_fork(after_in_child=_forget_random_bytes)


def reason(exc: BaseException) -> str:
    """An OS error as Go words it (``connection refused``), for error lines."""
    if isinstance(exc, TimeoutError):
        return "i/o timeout"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def local_address(sock: socket.socket) -> str:
    """The socket's own address for an error line (looked up only when there is one)."""
    try:
        return hostport(sock.getsockname())
    except OSError:
        return "?"


def hostport(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
