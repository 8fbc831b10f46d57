"""In-process counters and gauges, cheap enough for hot paths: a dict update under a lock.

The scheduler, submitter and callback endpoint record here; the metrics endpoint renders it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}

    @staticmethod
    def _key(name: str, labels: dict[str, str]) -> tuple[str, Labels]:
        return name, tuple(sorted(labels.items()))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = self._key(name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[self._key(name, labels)] = value

    def counter(self, name: str, **labels: str) -> float:
        """One counter's value; with fewer labels, the sum over the rest."""
        wanted = set(labels.items())
        with self._lock:
            return sum(
                value
                for (metric, key), value in self._counters.items()
                if metric == name and wanted <= set(key)
            )

    def gauge(self, name: str, **labels: str) -> float | None:
        with self._lock:
            return self._gauges.get(self._key(name, labels))

    def samples(self) -> Iterator[tuple[str, str, Labels, float]]:
        """(kind, name, labels, value) for every series, counters first."""
        with self._lock:
            counters = sorted(self._counters.items())
            gauges = sorted(self._gauges.items())
        for (name, labels), value in counters:
            yield "counter", name, labels, value
        for (name, labels), value in gauges:
            yield "gauge", name, labels, value
