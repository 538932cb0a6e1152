"""Metrics whose per-query cost is a dict update, rendered by prometheus-client on scrape.

``prometheus_client``'s ``Counter.labels(...).inc()`` costs about 1.5 us (a lock and a
label lookup); a plain dict update costs about 0.1 us. On a cache that answers a hit in a
few microseconds that difference is most of the budget, so plugins count into the plain
structures here and a collector turns them into Prometheus families only when
``/metrics`` is scraped.

The ``Metrics`` registry lives on the process ``Runtime``: metrics survive reloads (as
CoreDNS's do) and asking twice for the same name returns the same object, so a plugin
simply declares its metrics in ``setup`` every time it is built.

Usage::

    requests = block.runtime.metrics.counter(
        "coredns_cache_requests_total", "The count of cache requests.", ("server", "zone", "view"))
    requests.inc(("dns://:53", ".", ""))            # hot path
    duration = metrics.histogram("..._seconds", "...", ("server",), DURATION_BUCKETS)
    duration.observe(("dns://:53",), 0.0004)
    metrics.gauge("coredns_cache_entries", "...", ("server", "type"), lambda: {(s, "success"): 12})
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# prometheus-client is imported on the first scrape, not at startup: it costs ~20 ms and
# ~3.5 MB, and counting needs none of it.

Labels = tuple[str, ...]

# CoreDNS's plugin.TimeBuckets (seconds): used by request and proxy durations.
DURATION_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192,
)  # fmt: skip
# CoreDNS's size buckets (bytes) for request and response sizes.
SIZE_BUCKETS: tuple[float, ...] = (0, 100, 200, 300, 400, 511, 1023, 2047, 4095, 8291, 16000, 32000, 48000, 64000)


class CounterVec:
    """A counter family: ``inc(labels)`` adds to a plain dict keyed by the label tuple."""

    __slots__ = ("help", "labelnames", "name", "values")

    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def get(self, labels: Labels = ()) -> float:
        return self.values.get(labels, 0.0)

    def family(self) -> CounterMetricFamily:
        from prometheus_client.core import CounterMetricFamily

        # prometheus-client appends "_total" itself; it expects the name without it.
        base = self.name[:-6] if self.name.endswith("_total") else self.name
        family = CounterMetricFamily(base, self.help, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        return family


class HistogramVec:
    """A histogram family: ``observe`` bisects the bounds and bumps one slot of a list."""

    __slots__ = ("bounds", "help", "labelnames", "name", "series")

    def __init__(self, name: str, help: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(sorted(buckets))
        # Per label tuple: [count per bucket (non-cumulative) ..., +Inf count, sum]
        self.series: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        slots = self.series.get(labels)
        if slots is None:
            slots = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        slots[bisect.bisect_left(self.bounds, value)] += 1
        slots[-1] += value

    def count(self, labels: Labels = ()) -> float:
        slots = self.series.get(labels)
        return sum(slots[:-1]) if slots else 0.0

    def family(self) -> HistogramMetricFamily:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(self.name, self.help, labels=self.labelnames)
        for labels, slots in list(self.series.items()):
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(self.bounds, slots, strict=False):
                cumulative += count
                buckets.append((_bound_text(bound), cumulative))
            buckets.append(("+Inf", cumulative + slots[len(self.bounds)]))
            family.add_metric(labels, buckets, slots[-1])
        return family


class GaugeVec:
    """A gauge family: set values directly, or give a callback read at scrape time."""

    __slots__ = ("callbacks", "help", "labelnames", "name", "values")

    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.values: dict[Labels, float] = {}
        self.callbacks: dict[object, Callable[[], Mapping[Labels, float]]] = {}

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value

    def add_callback(self, owner: object, callback: Callable[[], Mapping[Labels, float]]) -> None:
        """Values computed on scrape; ``owner`` (a plugin) removes them with ``remove_callback``."""
        self.callbacks[owner] = callback

    def remove_callback(self, owner: object) -> None:
        self.callbacks.pop(owner, None)

    def current(self) -> dict[Labels, float]:
        values = dict(self.values)
        for callback in list(self.callbacks.values()):
            values.update(callback())
        return values

    def family(self) -> GaugeMetricFamily:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.help, labels=self.labelnames)
        for labels, value in self.current().items():
            family.add_metric(labels, value)
        return family


Metric = CounterVec | HistogramVec | GaugeVec


class Metrics:
    """The process's metric families, exported in the Prometheus text format."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}
        self._lock = threading.Lock()  # scrapes may come from another thread; updates are loop-only
        self._registry: CollectorRegistry | None = None  # made by the first render()

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> CounterVec:
        return self._declare(name, lambda: CounterVec(name, help, labelnames), CounterVec, labelnames)

    def histogram(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = DURATION_BUCKETS
    ) -> HistogramVec:
        return self._declare(name, lambda: HistogramVec(name, help, labelnames, buckets), HistogramVec, labelnames)

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> GaugeVec:
        return self._declare(name, lambda: GaugeVec(name, help, labelnames), GaugeVec, labelnames)

    def _declare(self, name: str, make: Callable[[], Any], kind: type, labelnames: Sequence[str]) -> Any:
        with self._lock:
            existing = self._families.get(name)
            if existing is None:
                existing = self._families[name] = make()
            elif not isinstance(existing, kind) or existing.labelnames != tuple(labelnames):
                raise ValueError(f"metric {name} is already declared with another type or labels")
            return existing

    def __contains__(self, name: str) -> bool:
        return name in self._families

    def __getitem__(self, name: str) -> Metric:
        return self._families[name]

    def collect(self) -> Iterator[Any]:
        """The prometheus-client collector protocol: one family per declared metric."""
        for metric in list(self._families.values()):
            yield metric.family()

    def render(self) -> bytes:
        """Everything in the Prometheus text exposition format."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)  # type: ignore[arg-type]
            self._registry = registry
        return generate_latest(self._registry)


def _bound_text(bound: float) -> str:
    return repr(float(bound)) if bound != int(bound) else f"{float(bound)}"
