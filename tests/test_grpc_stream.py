"""The client's gRPC stream (latentsync_client/grpc_stream.py): requests encoded in one copy are the messages
tritonclient sends, and errors reach the callback as tritonclient reports them. End to end it carries every client
and bench test that starts a server."""

import contextlib
import queue

import grpc
import numpy as np
import pytest
from tritonclient.grpc import InferInput, service_pb2
from tritonclient.grpc._utils import _get_inference_request  # what async_stream_infer builds
from tritonclient.utils import InferenceServerException

from latentsync_client.grpc_stream import InferStream, encode_request

PARAMETERS = {"steps": 20, "guidance": 1.5, "stream_token": "ab" * 16, "deepcache": False}


def tritonclient_request(inputs, request_id, sequence_id, start, end, parameters):
    tensors = []
    for name, array in inputs:
        tensor = InferInput(name, list(array.shape), {np.uint8: "UINT8", np.float32: "FP32"}[array.dtype.type])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    request = _get_inference_request(
        "lipsync", tensors, "", request_id, None, sequence_id, start, end, 0, None, parameters
    )
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


@pytest.mark.parametrize(
    "frames,audio",
    [
        (np.zeros((0, 1, 1, 3), np.uint8), np.linspace(-1, 1, 16000, dtype=np.float32)),  # audio, no frames
        (np.arange(4 * 9 * 16 * 3, dtype=np.uint8).reshape(4, 9, 16, 3), np.zeros(0, np.float32)),
        (np.arange(2 * 6 * 8 * 3, dtype=np.uint8).reshape(2, 6, 8, 3)[:, ::2], np.zeros(0, np.float32)),  # strided
    ],
)
def test_a_request_encoded_in_one_copy_is_the_message_tritonclient_sends(frames, audio):
    inputs = [("FRAMES", frames), ("AUDIO", audio)]
    for sequence_id, start, end, parameters in [(5, True, False, PARAMETERS), (5, False, True, None), (0, 0, 0, {})]:
        ours = encode_request(
            "lipsync",
            inputs,
            request_id="5-1",
            sequence_id=sequence_id,
            sequence_start=start,
            sequence_end=end,
            parameters=parameters,
        )
        theirs = tritonclient_request(inputs, "5-1", sequence_id, start, end, parameters)
        assert service_pb2.ModelInferRequest.FromString(ours) == theirs


def test_reserved_parameters_unsupported_types_and_oversized_requests_are_refused():
    reserved = ({"sequence_id": 3}, {"priority": 1}, {"timeout": 5}, {"triton_enable_empty_final_response": False})
    for sequence_id in (0, 1):
        for bad in (*reserved, {"x": [1]}):
            with pytest.raises(ValueError):
                encode_request("lipsync", [], sequence_id=sequence_id, parameters=bad)
    for array in (np.zeros(3, ">f4"), np.array([b"ab"]), np.zeros(2, complex)):
        with pytest.raises(ValueError):
            encode_request("lipsync", [("X", array)])
    huge = np.broadcast_to(np.zeros(1, np.uint8), (2**31,))  # 2 GiB of views, no memory
    with pytest.raises(ValueError, match="message limit"):
        encode_request("lipsync", [("X", huge)])


def test_scalars_and_parameter_subclasses_are_sent_as_tritonclient_sends_them():
    import enum

    class Steps(enum.IntEnum):
        TWENTY = 20

    ours = service_pb2.ModelInferRequest.FromString(
        encode_request("lipsync", [("S", np.float32(2.5))], parameters={"steps": Steps.TWENTY, "g": np.float64(1.5)})
    )
    assert list(ours.inputs[0].shape) == [] and ours.raw_input_contents[0] == np.float32(2.5).tobytes()
    assert ours.parameters["steps"].int64_param == 20 and ours.parameters["g"].double_param == 1.5


FAULTS_PER_REQUEST = """
import resource, sys
import numpy as np
from tritonclient.grpc import InferInput, service_pb2
from latentsync_client.grpc_stream import encode_request

frames = np.ones((4, 1080, 1920, 3), np.uint8)  # a request of four 1080p frames: 25 MB


def tritonclient_bytes():  # what tritonclient's stream does with a request: tobytes, into the message, encoded
    tensor = InferInput("FRAMES", list(frames.shape), "UINT8")
    tensor.set_data_from_numpy(frames)
    request = service_pb2.ModelInferRequest(model_name="lipsync")
    request.inputs.extend([tensor._get_tensor()])
    request.raw_input_contents.extend([tensor._get_content()])
    return request.SerializeToString()


encode = {"ours": lambda: encode_request("lipsync", [("FRAMES", frames)]), "tritonclient": tritonclient_bytes}
make = encode[sys.argv[1]]
alive = [make() for _ in range(2)]  # as a stream's queue holds a few
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    alive.pop(0)
    alive.append(make())
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def test_a_request_of_frames_is_copied_once_into_reused_memory():
    """What made tritonclient's path cost ~17 ms of CPU per 4-frame 1080p request (3 here): four copies, into
    pages that the kernel faults in and zeroes (~6,700 faults per request). One copy mostly reuses freed memory
    (~1,200). In a fresh interpreter with glibc's default settings, as a client runs."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(path: str) -> float:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_REQUEST, path], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    copy_pages = 4 * 1080 * 1920 * 3 / 4096
    ours, theirs = faults("ours"), faults("tritonclient")
    print(f"page faults per request: {ours:.0f} here, {theirs:.0f} through tritonclient; one copy {copy_pages:.0f}")
    assert ours < copy_pages / 2 and theirs > 3 * ours


def test_an_unreachable_server_and_a_cancel_reach_the_callback_with_the_grpc_code():
    """No server: UNAVAILABLE; a local cancel: CANCELLED, and close() returns (reading the debug string of a
    cancelled call would block for good)."""
    with socket_nobody_listens_on() as url:
        errors: queue.Queue = queue.Queue()
        stream = InferStream(url, callback=lambda result, error: errors.put((result, error)))
        with contextlib.suppress(InferenceServerException):  # refused if the call has failed already
            stream.send(encode_request("lipsync", [], sequence_id=1))
        result, error = errors.get(timeout=30)
        assert result is None and error.status() == str(grpc.StatusCode.UNAVAILABLE)
        stream.close()
    errors = queue.Queue()
    with socket_nobody_answers_on() as url:
        stream = InferStream(url, callback=lambda result, error: errors.put((result, error)))
        stream.close(cancel=True)
    result, error = errors.get(timeout=30)
    assert result is None and error.status() == str(grpc.StatusCode.CANCELLED)


class socket_nobody_listens_on:  # noqa: N801 - used as a context manager
    def __enter__(self) -> str:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()


class socket_nobody_answers_on(socket_nobody_listens_on):  # noqa: N801
    def __enter__(self) -> str:
        url = super().__enter__()
        self.sock.listen()  # accepts the connection, never speaks HTTP/2
        return url


def test_a_server_that_ends_the_call_early_is_reported_and_later_sends_refused():
    """A call the server ends with OK while the client still means to send (tritonclient said nothing: the client
    then waited its whole response timeout) reaches the callback as an error."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.stream_stream_rpc_method_handler(lambda requests, context: iter(()))  # ends at once, OK
    service = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelStreamInfer": handler})
    server.add_generic_rpc_handlers((service,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        errors: queue.Queue = queue.Queue()
        with InferStream(f"127.0.0.1:{port}", callback=lambda result, error: errors.put((result, error))) as stream:
            with contextlib.suppress(InferenceServerException):  # refused if the call has ended already
                stream.send(encode_request("lipsync", [], sequence_id=1))
            result, error = errors.get(timeout=30)
            assert result is None and "ended the stream" in error.message()
            with pytest.raises(InferenceServerException):
                stream.send(encode_request("lipsync", [], sequence_id=1))
    finally:
        server.stop(None)
