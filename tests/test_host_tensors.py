"""Host tensors out of Triton's Python stub: arrays it hands over that numpy owns are kept as they are (no copy),
anything else is copied before it may outlive its request or response (backend.private_array, owned_tensor).

The served path relies on the first half for its CPU per frame: copying the stub's own copies again cost `lipsync`
a fresh, kernel-zeroed 25 MB per request of four 1080p frames (RESULTS.md, thirteenth round). The real server
here pins the stub's behaviour that this relies on: its arrays of request inputs and of BLS outputs are its own
(python_backend's PbTensor copies them out of its pool), so keeping them past the request is safe."""

import mmap

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from helpers import write_python_model

from latentsync_serving.backend import owned_tensor, private_array


def test_arrays_numpy_owns_are_kept_views_of_them_too():
    owner = np.arange(24, dtype=np.uint8)
    view = owner.reshape(2, 3, 4)[:, 1:]  # a view of a view
    assert private_array(owner) is owner
    assert private_array(view) is view


def test_owned_arrays_torch_could_not_take_or_write_are_copied():
    owner = np.arange(24, dtype=np.uint8).reshape(4, 6)
    flipped = owner[::-1]  # a negative stride: torch.from_numpy refuses it
    read_only = owner.view()
    read_only.flags.writeable = False
    for array in (flipped, read_only):
        copy = private_array(array)
        assert copy is not array and copy.flags.writeable and copy.flags.c_contiguous
        np.testing.assert_array_equal(copy, array)


@pytest.mark.parametrize("kind", ["bytearray", "mmap"])
def test_views_of_buffers_numpy_does_not_own_are_copied(kind):
    buffer = bytearray(b"\x07" * 64) if kind == "bytearray" else mmap.mmap(-1, 64)
    foreign = np.frombuffer(buffer, np.uint8).reshape(4, 16)[1:]
    copy = private_array(foreign)
    assert copy is not foreign and copy.flags.owndata
    np.testing.assert_array_equal(copy, foreign)
    buffer[20] = 99  # the buffer's owner reuses it: the copy keeps the values it had
    assert copy[0, 4] != 99 and foreign[0, 4] == 99


def test_owned_tensor_shares_a_private_host_array_and_copies_a_foreign_one():
    class HostTensor:
        def __init__(self, array):
            self.array = array

        def is_cpu(self):
            return True

        def as_numpy(self):
            return self.array

    private = np.ones((2, 3), np.float32)
    assert owned_tensor(HostTensor(private)).data_ptr() == private.ctypes.data
    buffer = bytearray(24)
    foreign = np.frombuffer(buffer, np.float32).reshape(2, 3)
    owned = owned_tensor(HostTensor(foreign))
    assert owned.data_ptr() != foreign.ctypes.data
    buffer[:4] = np.float32(5).tobytes()
    assert torch.equal(owned, torch.zeros(2, 3))


PROBE_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

from latentsync_serving.backend import private_array


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            echo = pb_utils.InferenceRequest(
                model_name="echo", requested_output_names=["Y"], inputs=[pb_utils.Tensor("X", x)]
            ).exec()
            y = pb_utils.get_output_tensor_by_name(echo, "Y").as_numpy()
            private = np.array([private_array(x) is x, private_array(y) is y, np.array_equal(x, y)])
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PRIVATE", private)]))
        return responses
"""

PRIVATE_OUTPUT = 'name: "PRIVATE" data_type: TYPE_BOOL dims: [ 3 ]'
ECHO_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
            for r in requests
        ]
"""


def test_the_stubs_host_arrays_of_request_inputs_and_bls_outputs_are_private(tmp_path, triton_server):
    repo = tmp_path / "repo"
    frames = "data_type: TYPE_UINT8 dims: [ -1, -1, 3 ]"
    write_python_model(repo, "probe", PROBE_MODEL, input_spec=f'name: "X" {frames}', output_spec=PRIVATE_OUTPUT)
    write_python_model(repo, "echo", ECHO_MODEL, input_spec=f'name: "X" {frames}', output_spec=f'name: "Y" {frames}')
    server = triton_server(repo, timeout=120)
    frame = np.random.default_rng(0).integers(0, 256, (540, 960, 3), dtype=np.uint8)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        x = grpcclient.InferInput("X", list(frame.shape), "UINT8")
        x.set_data_from_numpy(frame)
        result = client.infer("probe", [x], outputs=[grpcclient.InferRequestedOutput("PRIVATE")])
    input_private, output_private, echoed = result.as_numpy("PRIVATE").tolist()
    assert echoed
    assert input_private, "the stub hands request inputs over as views of its pool: private_array copies them"
    assert output_private, "the stub hands BLS outputs over as views of its pool: private_array copies them"


REUSE_PROBE = """
import resource, sys
import numpy as np
from latentsync_serving.backend import reuse_frame_memory
if sys.argv[1] == "reuse":
    assert reuse_frame_memory()
    from latentsync_serving.backend import numpy_huge_pages
    assert numpy_huge_pages(False) is False  # it was off already: numpy advises no huge pages
frame = np.ones((1080, 1920, 3), np.uint8)
copies = [np.array(frame, copy=True) for _ in range(2)]  # as the stub copies each call's frame
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    copies.pop(0)
    copies.append(np.array(frame, copy=True))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_frame_sized_copies_reuse_memory_instead_of_fresh_zeroed_pages():
    """Under the server's malloc settings a 1080p frame's copy is a new mapping that faults in page by page (or
    2 MB page by 2 MB page); with reuse_frame_memory (the face detector) it reuses the arena's pages, and
    numpy advises no huge pages. Where the environment chose the allocator's settings, it leaves them."""
    import os
    import subprocess
    import sys

    from latentsync_serving.serve import allocator_env

    env = allocator_env({k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})

    def faults_per_copy(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    assert faults_per_copy("mapped") >= 3  # 6.2 MB: at least its 2 MB pages, else ~1,500 small ones
    assert faults_per_copy("reuse") < 1
    env["MALLOC_TRIM_THRESHOLD_"] = str(1 << 20)  # an operator's choice
    out = subprocess.run(
        [sys.executable, "-c", "from latentsync_serving.backend import reuse_frame_memory as r; print(r())"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "False", out.stderr
