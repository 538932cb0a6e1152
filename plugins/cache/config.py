"""Parsing ``cache [TTL] [ZONES...] { ... }`` into a ``CacheConfig``, with CoreDNS's defaults and checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from resolver.config import ServerBlock, zone_arguments
from resolver.corefile import Directive
from resolver.plugin import expect_args, parse_duration, raise_unknown_option

SHARDS = 256  # CoreDNS splits each cache into 256 shards; capacities are rounded to them
DEFAULT_CAPACITY = 10000  # CoreDNS's defaultCap, which becomes 256 * 39 = 9984 entries
MAX_TTL = 3600
MAX_DENIAL_TTL = 1800
MIN_TTL = 5
SERVFAIL_TTL = 5
MAX_SERVFAIL_TTL = 300  # RFC 2308 7.1: never cache a server failure longer than 5 minutes
STALE_DEFAULT = 3600.0
PREFETCH_DURATION = 60.0
PREFETCH_PERCENTAGE = 10


def effective_capacity(requested: int) -> int:
    """What CoreDNS really holds for a CAPACITY: whole shards, at least 4 entries each."""
    return max(requested // SHARDS, 4) * SHARDS


@dataclass
class CacheConfig:
    zones: list[str]
    success_capacity: int = effective_capacity(DEFAULT_CAPACITY)
    success_ttl: int = MAX_TTL
    success_min_ttl: int = MIN_TTL
    denial_capacity: int = effective_capacity(DEFAULT_CAPACITY)
    denial_ttl: int = MAX_DENIAL_TTL
    denial_min_ttl: int = MIN_TTL
    servfail_ttl: int = SERVFAIL_TTL  # whole seconds (a fraction is rounded up)
    prefetch: int = 0  # AMOUNT; 0 disables prefetching
    prefetch_duration: float = PREFETCH_DURATION
    prefetch_percentage: int = PREFETCH_PERCENTAGE
    stale: int = 0  # serve_stale DURATION in whole seconds; 0 disables it
    verify: bool = False  # serve_stale verify: ask upstream before serving an expired entry
    success_disabled: list[str] = field(default_factory=list)
    denial_disabled: list[str] = field(default_factory=list)
    keepttl: bool = False

    @property
    def zones_label(self) -> str:
        """The ``zones`` label of the cache metrics: the zones joined by commas, as CoreDNS."""
        return ",".join(self.zones)


def parse(directive: Directive, block: ServerBlock) -> CacheConfig:
    args = list(directive.args)
    ttl: int | None = None
    if args and _is_integer(args[0]):
        # As in CoreDNS, a first argument that is a number is the TTL, anything else a zone.
        ttl = int(args.pop(0))
        if ttl <= 0:
            raise directive.error(f"cache TTL can not be zero or negative: {ttl}")
    config = CacheConfig(zones=zone_arguments(args, directive) if args else list(block.zones))
    if ttl is not None:
        config.success_ttl = config.denial_ttl = ttl
    for option in directive.children:
        if option.block:
            raise option.error("takes no block")
        name = option.name
        if name in ("success", "denial"):
            _parse_kind(option, config)
        elif name == "prefetch":
            _parse_prefetch(option, config)
        elif name == "serve_stale":
            _parse_serve_stale(option, config)
        elif name == "servfail":
            (text,) = expect_args(option, 1, 1)
            seconds = parse_duration(text, option)
            if seconds > MAX_SERVFAIL_TTL:
                raise option.error("caching SERVFAIL responses over 5 minutes is not permitted")
            config.servfail_ttl = math.ceil(seconds)
        elif name == "disable":
            what, *zones = expect_args(option, 1)
            if what not in ("success", "denial"):
                raise option.error('cache type for disable must be "success" or "denial"')
            disabled = zone_arguments(zones, option) if zones else ["."]
            if what == "success":
                config.success_disabled = disabled
            else:
                config.denial_disabled = disabled
        elif name == "keepttl":
            expect_args(option, 0, 0)
            config.keepttl = True
        elif name == "serve_stale_policy":
            raise option.error("is not supported (serve_stale answers with the last entry it has)")
        else:
            raise raise_unknown_option(directive, option)
    return config


def _parse_kind(option: Directive, config: CacheConfig) -> None:
    """``success|denial CAPACITY [TTL [MINTTL]]``."""
    args = expect_args(option, 1, 3)
    capacity = _integer(args[0], option)
    if capacity < 0:
        raise option.error(f"capacity can not be negative: {capacity}")
    prefix = "success" if option.name == "success" else "denial"
    setattr(config, f"{prefix}_capacity", effective_capacity(capacity))
    if len(args) > 1:
        ttl = _integer(args[1], option)
        if ttl <= 0:
            raise option.error(f"cache TTL can not be zero or negative: {ttl}")
        setattr(config, f"{prefix}_ttl", ttl)
    if len(args) > 2:
        min_ttl = _integer(args[2], option)
        if min_ttl < 0:
            raise option.error(f"cache min TTL can not be negative: {min_ttl}")
        setattr(config, f"{prefix}_min_ttl", min_ttl)


def _parse_prefetch(option: Directive, config: CacheConfig) -> None:
    """``prefetch AMOUNT [[DURATION] [PERCENTAGE%]]`` (the second argument is always DURATION)."""
    args = expect_args(option, 1, 3)
    amount = _integer(args[0], option)
    if amount < 0:
        raise option.error(f"prefetch amount should be positive: {amount}")
    config.prefetch = amount
    if len(args) > 1:
        config.prefetch_duration = parse_duration(args[1], option)
    if len(args) > 2:
        text = args[2]
        if not text.endswith("%"):
            raise option.error(f'last character of percentage should be "%", but is: "{text[-1]}"')
        percentage = _integer(text[:-1], option)
        if not 10 <= percentage <= 90:
            raise option.error(f"percentage should fall in range [10, 90]: {percentage}")
        config.prefetch_percentage = percentage


def _parse_serve_stale(option: Directive, config: CacheConfig) -> None:
    """``serve_stale [DURATION] [immediate|verify]``."""
    if len(option.args) > 2:
        raise option.error(
            "expected at most 2 arguments (DURATION and immediate|verify); "
            "VERIFY_TIMEOUT, RESPONSE_TTL and FAILURE_RECHECK are not supported"
        )
    config.stale = math.ceil(STALE_DEFAULT)
    config.verify = False
    if option.args:
        config.stale = math.ceil(parse_duration(option.args[0], option))
    if len(option.args) > 1:
        mode = option.args[1].lower()
        if mode not in ("immediate", "verify"):
            raise option.error(f"invalid value for serve_stale refresh mode: {option.args[1]}")
        config.verify = mode == "verify"


def _is_integer(text: str) -> bool:
    body = text[1:] if text[:1] in "+-" else text
    return body.isascii() and body.isdigit()


def _integer(text: str, option: Directive) -> int:
    if not _is_integer(text):
        raise option.error(f'"{text}" is not a number')
    return int(text)
