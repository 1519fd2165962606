"""StepBatcher: concurrent streams' UNet steps merged into one request, each caller getting its own rows."""
import threading
import time

import numpy as np
import pytest

from latentsync_export.step_batcher import StepBatcher


class SerialModel:
    """A model with one instance: calls run one at a time and take `seconds`; records each batch's size."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.lock, self.batches = seconds, threading.Lock(), []

    def __call__(self, inputs):
        with self.lock:
            time.sleep(self.seconds)
            self.batches.append(len(inputs["X"]))
            return [inputs["X"] * 2, inputs["X"].sum(axis=(1, 2))]


def run_streams(batcher, n_streams: int, steps: int, start_delays, rows: int = 2, work_s: float = 0.0):
    """Each stream thread makes `steps` calls with its own data; returns per-stream [(input, outputs)]."""
    results = [[] for _ in range(n_streams)]

    def stream(i):
        time.sleep(start_delays[i])
        for k in range(steps):
            x = np.full((rows, 3, 4), 100 * i + k, np.float32)
            results[i].append((x, batcher({"X": x})))
            time.sleep(work_s)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def check_rows(results):
    for per_stream in results:
        for x, (doubled, sums) in per_stream:
            np.testing.assert_array_equal(doubled, 2 * x)
            np.testing.assert_array_equal(sums, x.sum(axis=(1, 2)))


def test_one_stream_never_waits():
    model = SerialModel()
    batcher = StepBatcher(model, expected=lambda: 1, max_wait_s=5.0)
    start = time.monotonic()
    check_rows(run_streams(batcher, 1, 5, [0.0]))
    assert time.monotonic() - start < 1.0
    assert model.batches == [2] * 5


def test_concurrent_streams_share_requests_and_get_their_own_rows():
    model = SerialModel(0.05)
    batcher = StepBatcher(model, expected=lambda: 4, max_wait_s=2.0)
    results = run_streams(batcher, 4, 6, [0.0, 0.03, 0.06, 0.09])
    check_rows(results)
    assert sum(model.batches) == 4 * 6 * 2
    assert np.mean(model.batches) / 2 >= 3.5          # windows per request (all 4, bar the start-up)


def test_groups_that_alternate_on_a_busy_model_merge():
    """Two groups arriving half a call apart (on Triton's batcher alone they would alternate forever)."""
    delays = [0.0, 0.0, 0.1, 0.1]
    model = SerialModel(0.2)
    batcher = StepBatcher(model, expected=lambda: 4, max_wait_s=1.0)
    check_rows(run_streams(batcher, 4, 5, delays))
    assert np.mean(model.batches) / 2 >= 3


def test_max_batch_splits_groups():
    model = SerialModel(0.02)
    batcher = StepBatcher(model, expected=lambda: 4, max_batch=4, max_wait_s=1.0)
    check_rows(run_streams(batcher, 4, 3, [0.0] * 4))
    assert max(model.batches) <= 4 and sum(model.batches) == 24


def test_waits_at_most_the_deadline_for_missing_streams():
    model = SerialModel()
    batcher = StepBatcher(model, expected=lambda: 3, max_wait_s=0.3)
    start = time.monotonic()
    check_rows(run_streams(batcher, 2, 1, [0.0, 0.0]))
    assert 0.25 <= time.monotonic() - start < 2.0
    assert model.batches == [4]
    # afterwards the wait follows the model's call time (a fraction of it), not the cap
    batcher.wait_fraction = 0.5
    assert batcher.wait_s() <= 0.5 * 0.3


def test_different_shapes_are_separate_requests():
    model = SerialModel()
    batcher = StepBatcher(model, expected=lambda: 2, max_wait_s=0.5)
    out = {}

    def call(name, rows):
        x = np.ones((2, rows, 4), np.float32)
        out[name] = batcher({"X": x})

    threads = [threading.Thread(target=call, args=(n, r)) for n, r in (("a", 3), ("b", 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(model.batches) == [2, 2]
    assert out["a"][0].shape == (2, 3, 4) and out["b"][0].shape == (2, 5, 4)


def test_an_error_reaches_every_caller_of_the_group():
    def failing(inputs):
        time.sleep(0.05)
        raise RuntimeError("model 'unet_1.5' failed: boom")

    batcher = StepBatcher(failing, expected=lambda: 3, max_wait_s=1.0)
    errors = []

    def call():
        with pytest.raises(RuntimeError, match="boom") as e:
            batcher({"X": np.zeros((2, 1), np.float32)})
        errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 3
    assert batcher.stats.requests == 1
