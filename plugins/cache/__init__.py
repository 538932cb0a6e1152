"""cache: answer repeated questions from memory, as CoreDNS's cache plugin does.

Syntax::

    cache [TTL] [ZONES...] [{
        success CAPACITY [TTL] [MINTTL]           # positive answers (default 9984 3600 5)
        denial CAPACITY [TTL] [MINTTL]            # NXDOMAIN, NODATA, SERVFAIL (default 9984 1800 5)
        prefetch AMOUNT [[DURATION] [PERCENTAGE%]]  # refresh popular entries (1m, 10%)
        serve_stale [DURATION] [immediate|verify]   # answer from expired entries (1h, immediate)
        servfail DURATION                         # how long SERVFAIL is kept (5s, at most 5m)
        disable success|denial [ZONES...]         # do not cache that kind in ZONES (default all)
        keepttl                                   # serve the stored TTL instead of counting down
    }]

TTL caps both kinds (a number as first argument; anything else starts ZONES). ZONES
default to the server block's zones. CAPACITY is rounded down to a multiple of 256 with
at least 1024, as CoreDNS's 256 shards do; a full cache evicts a random entry.

What is kept and for how long:

* NOERROR with answers (or a referral): the smallest TTL of its records, within
  [MINTTL, TTL]. Every record is served with the entry's remaining TTL.
* NXDOMAIN and NODATA: min(SOA TTL, SOA MINIMUM) of the authority SOA (RFC 2308), within
  [MINTTL, TTL]; without an SOA, the denial MINTTL. SERVFAIL: the ``servfail`` duration.
* Never: truncated replies, REFUSED, FORMERR, NOTIMP and other RCODEs, zone transfers,
  and replies whose question is not the query's (counted in ``drops``).

The key is the query name (any letter case), type, class, the DO and CD bits and the
EDNS version; not the EDNS buffer size or options (a cookie changes on every query). A hit
is answered from the stored bytes with the client's ID, RD bit and question (0x20 letter
case preserved), without parsing anything, and without waiting.

Consistency, beyond CoreDNS:

* A name never has a cached NXDOMAIN next to a cached NOERROR of any type: a fresh
  NXDOMAIN removes the name's NOERROR entries, a fresh NOERROR its NXDOMAIN entries
  (RFC 8020). The A and AAAA entries of a name share one expiry (the earlier), so both
  are asked upstream again together, and an evicted A takes its AAAA along.
* An answer marked client-specific (autopath) makes its name client-dependent for a
  while: the name's shared entries are dropped and each client address gets its own
  entries for that name (every type), so no client ever sees another's answer, nor a
  mix of shared and own answers.

Metrics (CoreDNS's names and labels): ``coredns_cache_entries{server,type,zones,view}``,
``coredns_cache_hits_total{server,type,zones,view}``, ``coredns_cache_misses_total``,
``coredns_cache_requests_total``, ``coredns_cache_prefetch_total``,
``coredns_cache_drops_total``, ``coredns_cache_served_stale_total`` (``{server,zones,view}``)
and ``coredns_cache_evictions_total{server,type,zones,view}``.
"""

from plugins.cache.plugin import Cache

__all__ = ["Cache"]
