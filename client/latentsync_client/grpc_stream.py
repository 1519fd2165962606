"""One ModelStreamInfer call (Triton's gRPC bidirectional stream) whose requests are encoded in one copy.

tritonclient builds a request as a protobuf message and then serializes it: an input's bytes are copied four times
on the way (numpy's tobytes, into the message, its encoding, a Python bytes object), mostly into pages that the
kernel faults in and zeroes: ~17 ms of CPU for a request of four 1080p frames (25 MB), 3 ms in one copy; the stand-in
bench's client CPU per frame fell by 42-66 % (RESULTS.md, fifteenth round). Here only the small part of the message
(every field but the inputs' bytes) is a protobuf; each input's bytes follow it as one `raw_input_contents` entry (a
length-delimited field; protobuf parsers merge a repeated field's entries wherever they appear, so the server reads
the message tritonclient would have sent), joined with it in one copy (gRPC's core copies the message once more as
it sends it). Responses and errors reach the callback as tritonclient reports them: an `InferResult`, or an
`InferenceServerException` whose status names the gRPC code.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Mapping, Sequence

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import (
    TRITON_RESERVED_REQUEST_PARAMS,
    TRITON_RESERVED_REQUEST_PARAMS_PREFIX,
    InferenceServerException,
    np_to_triton_dtype,
)

METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
_RAW_INPUT_TAG = bytes([service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3 | 2])
MAX_MESSAGE_BYTES = 2**31 - 1  # tritonclient's channel limits: a request of frames is tens of MB
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

# a request parameter's protobuf field by its Python type; bool first, as bools are ints
_PARAMETER_FIELDS = ((bool, "bool_param"), (int, "int64_param"), (float, "double_param"), (str, "string_param"))

Callback = Callable[[InferResult | None, InferenceServerException | None], None]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_request(
    model: str,
    inputs: Sequence[tuple[str, np.ndarray]],
    *,
    request_id: str = "",
    sequence_id: int = 0,
    sequence_start: bool = False,
    sequence_end: bool = False,
    parameters: Mapping[str, str | bool | int | float] | None = None,
    empty_final_response: bool = True,
) -> bytes:
    """The serialized ModelInferRequest that tritonclient's async_stream_infer sends for these (name, array)
    inputs and arguments (empty_final_response: enable_empty_final_response)."""
    size = sum(array.nbytes for _, array in inputs)
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"a request of {size} bytes is over gRPC's message limit of {MAX_MESSAGE_BYTES}")
    header = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    contents = []
    for name, array in inputs:
        datatype = np_to_triton_dtype(array.dtype)
        if datatype in (None, "BYTES") or not array.dtype.isnative:
            raise ValueError(f"input {name!r}: {array.dtype} is not a fixed-size type in this machine's byte order")
        header.inputs.add(name=name, datatype=datatype, shape=np.shape(array))
        array = np.ascontiguousarray(array)
        contents += [_RAW_INPUT_TAG + _varint(array.nbytes), array.reshape(-1).view(np.uint8)]
    fields = header.parameters
    if sequence_id:
        fields["sequence_id"].int64_param = sequence_id
        fields["sequence_start"].bool_param = sequence_start
        fields["sequence_end"].bool_param = sequence_end
    if empty_final_response:
        fields["triton_enable_empty_final_response"].bool_param = True
    for key, value in (parameters or {}).items():
        if key in TRITON_RESERVED_REQUEST_PARAMS or key.startswith(TRITON_RESERVED_REQUEST_PARAMS_PREFIX):
            raise ValueError(f"request parameter {key!r} is reserved")
        kind = next((kind for t, kind in _PARAMETER_FIELDS if isinstance(value, t)), None)
        if kind is None:
            raise ValueError(f"request parameter {key!r}: {type(value).__name__} is not a str, bool, int or float")
        setattr(fields[key], kind, value)
    return b"".join([header.SerializeToString(), *contents])


class InferStream:
    """A ModelStreamInfer call on a channel of its own: `send` queues encoded requests (encode_request), and
    `callback(result, error)` gets each response on the stream's reader thread."""

    def __init__(self, url: str, callback: Callback, channel_options: Sequence[tuple[str, int]] = CHANNEL_OPTIONS):
        self._channel = grpc.insecure_channel(url, options=list(channel_options))
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        call = self._channel.stream_stream(
            METHOD,
            request_serializer=None,  # the requests are bytes already
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        self._responses = call(iter(self._requests.get, None))
        self._callback = callback
        self.active, self._closing = True, False
        self._reader = threading.Thread(target=self._read, name="lipsync-stream-responses", daemon=True)
        self._reader.start()

    def send(self, request: bytes) -> None:
        """Queue one encoded request; InferenceServerException once the stream has broken (the callback said why)."""
        if not self.active:
            raise InferenceServerException("the stream is no longer active: its callback was given the error")
        self._requests.put(request)

    def __enter__(self) -> InferStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close(cancel=exc[0] is not None)

    def close(self, cancel: bool = False) -> None:
        """End the request stream and wait for the server's last response; with `cancel`, drop what is pending."""
        self._closing = True
        if cancel:
            self._responses.cancel()
        self._requests.put(None)  # ends the request iterator (after a cancel it only unblocks gRPC's reader of it)
        self._reader.join()
        self._channel.close()

    def _read(self) -> None:
        try:
            for response in self._responses:
                if response.error_message:
                    self._callback(None, InferenceServerException(msg=response.error_message))
                else:
                    self._callback(InferResult(response.infer_response), None)
            self.active = False
            if not self._closing:  # the server ended the call with OK while requests may still come: say so
                self._callback(None, InferenceServerException(msg="the server ended the stream"))
        except grpc.RpcError as e:
            self.active = self._responses.is_active()
            # code and details only: after a local cancel the call's debug_error_string() never comes (it blocks)
            code = e.code()
            message = e.details() or ("Locally cancelled by application!" if code == grpc.StatusCode.CANCELLED else "")
            self._callback(None, InferenceServerException(msg=message, status=str(code)))
