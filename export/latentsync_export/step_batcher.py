"""Cross-stream batching of UNet steps, done by the orchestrator that knows how many streams are working.

Triton's dynamic batcher merges only requests that are queued at the same moment. Concurrent streams drift
apart (per-stream work between model calls runs one thread at a time in the `lipsync` stub, per-frame models
split big batches), and once two groups of streams alternate on a single UNet instance they never meet again:
each group arrives while the other one executes. `StepBatcher` lets a stream's UNet call wait, up to about one
UNet call's duration, for the other working streams' calls and sends them as ONE request. With one UNet
instance that wait costs (almost) nothing: the late call would have queued behind the running one anyway.

    batcher = StepBatcher(lambda inputs: bls_call("unet_1.5", inputs), expected=service.working_streams,
                          max_batch=8)
    noise_pred, = batcher({"SAMPLE": s, "TIMESTEP": t, "AUDIO": a})     # from each stream's thread

A group is sent when it holds `expected()` calls, reaches `max_batch` items, or its oldest call has waited
`wait_fraction` x the recent call duration (at most `max_wait_s`). One working stream never waits. Calls with
different non-batch shapes (a stream's shorter last window) are grouped separately.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

Call = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    size: int
    key: tuple
    arrived: float
    taken: bool = False     # in a group being sent
    done: bool = False
    result: list[np.ndarray] | None = None
    error: BaseException | None = None


@dataclass
class BatcherStats:
    calls: int = 0          # callers served
    requests: int = 0       # merged requests sent
    items: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # callers per request -> count


class StepBatcher:
    def __init__(self, call: Call, expected: Callable[[], int], *, max_batch: int | None = None,
                 wait_fraction: float = 1.0, max_wait_s: float = 30.0):
        if wait_fraction < 0 or max_wait_s < 0:
            raise ValueError("wait_fraction and max_wait_s must be >= 0")
        self.call, self.expected = call, expected
        self.max_batch, self.wait_fraction, self.max_wait_s = max_batch, wait_fraction, max_wait_s
        self.stats = BatcherStats()
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._collecting: set[tuple] = set()
        self._duration: float | None = None   # recent call duration (EMA), seconds

    def wait_s(self) -> float:
        """How long a group waits for more calls: a fraction of a recent call (max_wait_s before any)."""
        if self._duration is None:
            return self.max_wait_s if self.wait_fraction else 0.0
        return min(self.max_wait_s, self.wait_fraction * self._duration)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        first = next(iter(inputs.values()))
        me = _Pending(inputs, len(first), tuple((k, v.shape[1:], v.dtype.str) for k, v in inputs.items()),
                      time.monotonic())
        with self._cond:
            self._pending.append(me)
            self._cond.notify_all()
            while not me.done:
                if me.taken or me.key in self._collecting:
                    self._cond.wait()
                    continue
                self._collecting.add(me.key)
                try:
                    group = self._collect(me.key)
                finally:
                    self._collecting.discard(me.key)
                    self._cond.notify_all()          # the rest of the pending calls get a collector
                self._cond.release()
                try:
                    self._run(group)
                finally:
                    self._cond.acquire()
        if me.error is not None:
            raise me.error
        return me.result

    def _collect(self, key: tuple) -> list[_Pending]:
        """With the lock held: wait until the group of `key` is complete, full or old enough; take it."""
        while True:
            group = [p for p in self._pending if p.key == key]
            items = sum(p.size for p in group)
            left = group[0].arrived + self.wait_s() - time.monotonic()
            if (self.max_batch and items >= self.max_batch) or len(group) >= self.expected() or left <= 0:
                break
            self._cond.wait(left)
        taken, items = [], 0
        for p in group:
            if taken and self.max_batch and items + p.size > self.max_batch:
                break
            taken.append(p)
            items += p.size
        for p in taken:
            p.taken = True
            self._pending.remove(p)
        return taken

    def _run(self, group: list[_Pending]) -> None:
        """One request for the whole group (outside the lock); results or the error go to every caller."""
        start = time.monotonic()
        try:
            if len(group) == 1:
                outputs = self.call(dict(group[0].inputs))
            else:
                merged = {k: np.concatenate([p.inputs[k] for p in group]) for k in group[0].inputs}
                outputs = self.call(merged)
            cuts = np.cumsum([p.size for p in group])[:-1]
            parts = [np.split(out, cuts) for out in outputs]
            results, error = [[part[i] for part in parts] for i in range(len(group))], None
        except BaseException as e:  # noqa: BLE001 - every caller of the group sees the failure
            results, error = None, e
        elapsed = time.monotonic() - start
        with self._cond:
            self._duration = elapsed if self._duration is None else 0.7 * self._duration + 0.3 * elapsed
            s = self.stats
            s.calls, s.requests, s.items = s.calls + len(group), s.requests + 1, s.items + sum(p.size for p in group)
            s.sizes[len(group)] = s.sizes.get(len(group), 0) + 1
            for i, p in enumerate(group):
                p.result, p.error, p.done = (results[i] if results else None), error, True
            self._cond.notify_all()
