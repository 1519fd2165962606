"""Custom metrics on Triton's Prometheus endpoint (Python backend MetricFamily) and the stub's logger.

Every metric carries the label model=<model name>, plus any labels given when it is updated. Outside a server
(pb_utils without MetricFamily) the values are kept in `values` only, so the code that updates them runs
unchanged in tests.
"""

from __future__ import annotations

import threading
from typing import Mapping


class Metrics:
    def __init__(
        self, pb_utils, model: str, counters: Mapping[str, str] | None = None, gauges: Mapping[str, str] | None = None
    ):
        self.model = model
        self.values: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self._families: dict[str, object] = {}  # a family must outlive its metrics
        self._metrics: dict[tuple, object] = {}
        family = getattr(pb_utils, "MetricFamily", None)
        if family is not None:
            for kind, names in ((family.COUNTER, counters or {}), (family.GAUGE, gauges or {})):
                for name, description in names.items():
                    self._families[name] = family(name=name, description=description, kind=kind)

    def _metric(self, name: str, labels: dict):
        key = (name, *sorted(labels.items()))
        if key not in self._metrics and name in self._families:
            self._metrics[key] = self._families[name].Metric(labels={"model": self.model, **labels})
        return key, self._metrics.get(key)

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            key, metric = self._metric(name, labels)
            self.values[key] = self.values.get(key, 0.0) + value
            if metric is not None:
                metric.increment(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge; an unchanged value is not sent again (each update is a round trip from the stub to the
        server process, and gauges are set per request or per denoiser iteration)."""
        with self._lock:
            key, metric = self._metric(name, labels)
            if self.values.get(key) == value:
                return
            self.values[key] = value
            if metric is not None:
                metric.set(value)


def log(pb_utils, level: str, message: str) -> None:
    """The stub's logger (Triton's log), or stdout outside a server."""
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)
    else:
        print(message, flush=True)
