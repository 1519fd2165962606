"""The contract's arithmetic that clients share (latentsync_contract)."""

import pytest

from latentsync_contract import WINDOW, request_spans


@pytest.mark.parametrize("n_frames", [1, 2, 15, 16, 17, 31, 32, 33, 100])
@pytest.mark.parametrize("per_request", [1, 3, 4, 5, 16])
def test_request_spans_end_each_window_with_its_last_frame_alone(n_frames, per_request):
    spans = request_spans(n_frames, per_request)
    assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]] and spans[-1][1] == n_frames  # every frame once
    for start, stop in spans:
        assert 1 <= stop - start <= per_request
        assert (stop - 1) // WINDOW == start // WINDOW  # never across a window's end
        completes = stop % WINDOW == 0 or stop == n_frames
        assert not completes or stop - start == 1  # the request the server keeps open holds one frame


def test_request_spans_of_latentsync_clients_default():
    assert [b - a for a, b in request_spans(2 * WINDOW + 3, 4)] == [4, 4, 4, 3, 1] * 2 + [2, 1]
    with pytest.raises(ValueError):
        request_spans(4, 0)
