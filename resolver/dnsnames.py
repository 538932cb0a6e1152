"""DNS names and mnemonics as CoreDNS treats and prints them.

Log lines, error lines and metric labels must read as CoreDNS's do, so dashboards and
log queries built for CoreDNS keep working: ``A``, ``NSAP-PTR``, ``TYPE65280``,
``CLASS255``, ``NXDOMAIN``. Zone membership is tested on the presentation text that
``Request.qname`` gives (lower case, final dot, dots inside labels escaped).
"""

from __future__ import annotations

from collections.abc import Iterable

# Mnemonics as miekg/dns prints them (Type.String, Class.String, RcodeToString), so that
# lines and dashboards built on CoreDNS's output match.
TYPE_NAMES: dict[int, str] = {
    0: "None", 1: "A", 2: "NS", 3: "MD", 4: "MF", 5: "CNAME", 6: "SOA", 7: "MB", 8: "MG", 9: "MR",
    10: "NULL", 12: "PTR", 13: "HINFO", 14: "MINFO", 15: "MX", 16: "TXT", 17: "RP", 18: "AFSDB",
    19: "X25", 20: "ISDN", 21: "RT", 23: "NSAP-PTR", 24: "SIG", 25: "KEY", 26: "PX", 27: "GPOS",
    28: "AAAA", 29: "LOC", 30: "NXT", 31: "EID", 32: "NIMLOC", 33: "SRV", 34: "ATMA", 35: "NAPTR",
    36: "KX", 37: "CERT", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS", 44: "SSHFP", 45: "IPSECKEY",
    46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID", 50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA",
    53: "SMIMEA", 55: "HIP", 56: "NINFO", 57: "RKEY", 58: "TALINK", 59: "CDS", 60: "CDNSKEY",
    61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD", 64: "SVCB", 65: "HTTPS", 99: "SPF", 100: "UINFO",
    101: "UID", 102: "GID", 103: "UNSPEC", 104: "NID", 105: "L32", 106: "L64", 107: "LP",
    108: "EUI48", 109: "EUI64", 128: "NXNAME", 249: "TKEY", 250: "TSIG", 251: "IXFR", 252: "AXFR",
    253: "MAILB", 254: "MAILA", 255: "ANY", 256: "URI", 257: "CAA", 258: "AVC", 260: "AMTRELAY",
    261: "RESINFO", 32768: "TA", 32769: "DLV", 65535: "Reserved",
}  # fmt: skip
# ANY (255) is left out on purpose: miekg prints CLASS255 because ANY is also a type.
CLASS_NAMES: dict[int, str] = {1: "IN", 2: "CS", 3: "CH", 4: "HS", 254: "NONE"}
RCODE_NAMES: dict[int, str] = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 6: "YXDOMAIN",
    7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 11: "DSOTYPENI", 16: "BADSIG", 17: "BADKEY",
    18: "BADTIME", 19: "BADMODE", 20: "BADNAME", 21: "BADALG", 22: "BADTRUNC", 23: "BADCOOKIE",
}  # fmt: skip


def type_text(qtype: int) -> str:
    """A query type as CoreDNS prints it: ``A``, ``HTTPS``, ``TYPE65280``."""
    return TYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def class_text(qclass: int) -> str:
    """A query class as CoreDNS prints it: ``IN``, ``CH``, ``CLASS255``."""
    return CLASS_NAMES.get(qclass) or f"CLASS{qclass}"


def rcode_text(rcode: int) -> str:
    return RCODE_NAMES.get(rcode) or str(rcode)


def rcode_label(rcode: int) -> str:
    """The ``rcode`` label of CoreDNS's metrics: as ``rcode_text``, but ``RCODE<n>`` when unknown."""
    return RCODE_NAMES.get(rcode) or f"RCODE{rcode}"


def in_zone(name: str, zone: str) -> bool:
    """Is ``name`` ``zone`` or below it? Both lower case with a final dot; a dot escaped
    inside a label (``a\\.example.org.``) is not a label boundary."""
    if zone == "." or name == zone:
        return True
    cut = len(name) - len(zone) - 1
    if cut < 0 or not name.endswith(zone) or name[cut] != ".":
        return False
    backslashes = 0
    while cut - 1 - backslashes >= 0 and name[cut - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 0


def in_zones(name: str, zones: Iterable[str]) -> bool:
    """Is ``name`` in (equal to or below) any of ``zones``?"""
    return any(in_zone(name, zone) for zone in zones)
