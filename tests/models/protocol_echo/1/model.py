"""PROTOCOL CONFORMANCE DOUBLE for client tests, NOT the product: implements the `lipsync` streaming contract
(docs/PROTOCOL.md, latentsync_contract) without any model. It checks what a client sends (audio first, frame
count from the audio length, one frame size, parameters, sequence flags) and echoes every frame back
unchanged, one response per 16-frame window, with FRAME_INDEX: as the product answers, as regions (REGION_BOX,
REGIONS), here each "face" frame's central half with its own pixels; a uniform frame (all pixels equal) is
reported as FACE_FOUND=false, and a stream in which no frame had a "face" ends with the `no face found` error
after its frames came back.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from latentsync_contract import (
    AUDIO,
    FACE_FOUND,
    FRAME_INDEX,
    FRAMES,
    REGION_BOX,
    REGIONS,
    WINDOW,
    ContractError,
    StreamParams,
    check_frames_shape,
    no_face_message,
    num_frames_for_audio,
)

SEQUENCE_START, SEQUENCE_END = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_*
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class ProtocolViolation(Exception):
    pass


class Stream:
    def __init__(self, parameters, variants):
        try:
            self.params = StreamParams.parse(parameters, variants)
        except ContractError as e:
            raise ProtocolViolation(str(e)) from None
        self.n_samples, self.frames, self.next_index, self.size = 0, [], 0, None
        self.with_face = 0

    def add(self, frames, audio):
        if len(audio) and (self.next_index or self.frames):
            raise ProtocolViolation("AUDIO: audio must all come before the first frames")
        try:
            check_frames_shape(frames.shape)
        except ContractError as e:
            raise ProtocolViolation(str(e)) from None
        if len(frames) and self.n_samples == 0:
            raise ProtocolViolation("FRAMES: frames sent before any audio")
        if len(frames):
            if self.size is None:
                self.size = frames.shape[1:]
            elif frames.shape[1:] != self.size:
                raise ProtocolViolation(f"FRAMES: size changed from {self.size} to {frames.shape[1:]}")
        self.n_samples += len(audio)
        self.frames.extend(frames)
        expected = num_frames_for_audio(self.n_samples)
        if len(frames) and self.next_index + len(self.frames) > expected:
            raise ProtocolViolation(f"FRAMES: more than the {expected} frames the audio calls for")

    def windows(self, end):
        while len(self.frames) >= WINDOW or (end and self.frames):
            window, self.frames = np.stack(self.frames[:WINDOW]), self.frames[WINDOW:]
            index = np.arange(self.next_index, self.next_index + len(window), dtype=np.int64)
            self.next_index += len(window)
            face = np.ptp(window.reshape(len(window), -1), axis=1) > 0
            self.with_face += int(face.sum())
            yield window, index, face
        if end and self.next_index != num_frames_for_audio(self.n_samples):
            raise ProtocolViolation(
                f"FRAMES: the audio calls for {num_frames_for_audio(self.n_samples)} "
                f"frames, the stream ended after {self.next_index}"
            )
        if end and self.next_index and not self.with_face:
            raise ProtocolViolation(no_face_message(self.next_index))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.delay = float(parameters["window_delay_s"])
        self.variants = parameters["variants"].split(",")
        self.streams, self.failed = {}, set()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            sid, flags = request.correlation_id(), request.flags()
            try:
                self.handle(request, sid, flags, sender)
            except ProtocolViolation as e:
                self.streams.pop(sid, None)
                self.failed.add(sid)
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
            if flags & SEQUENCE_END:
                self.streams.pop(sid, None)
                self.failed.discard(sid)
            sender.send(flags=FINAL)
        return None

    def handle(self, request, sid, flags, sender):
        if flags & SEQUENCE_START:
            self.failed.discard(sid)
            self.streams[sid] = Stream(json.loads(request.parameters() or "{}"), self.variants)
        if sid in self.failed:  # the error was reported; ignore the rest of the stream
            return
        if sid not in self.streams:
            raise ProtocolViolation("sequence_start: the first request of a stream must start the sequence")
        stream = self.streams[sid]
        frames = pb_utils.get_input_tensor_by_name(request, FRAMES).as_numpy()
        audio = pb_utils.get_input_tensor_by_name(request, AUDIO).as_numpy()
        stream.add(frames, audio)
        for window, index, face in stream.windows(end=bool(flags & SEQUENCE_END)):
            time.sleep(self.delay)
            h, w = window.shape[1:3]
            box = np.array([h // 4, h - h // 4, w // 4, w - w // 4], np.int32)
            boxes = np.where(face[:, None], box, 0).astype(np.int32)
            regions = [f[box[0] : box[1], box[2] : box[3]].reshape(-1) for f, found in zip(window, face) if found]
            sender.send(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor(FRAME_INDEX, index),
                        pb_utils.Tensor(FACE_FOUND, face),
                        pb_utils.Tensor(REGION_BOX, boxes),
                        pb_utils.Tensor(REGIONS, np.concatenate(regions) if regions else np.zeros(0, np.uint8)),
                    ]
                )
            )
