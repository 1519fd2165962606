"""Locust load test: users stream a real clip through the `lipsync` model over gRPC (docs/PROTOCOL.md).

    latentsync-locust --headless -u 4 -r 4 --host 127.0.0.1:8001 \
        --clip ../shared/media/retalking_face2.mp4 --clip-seconds 2 --steps 20 --streams-per-user 1 \
        --csv /tmp/locust --summary-json /tmp/locust/summary.json

Each user opens one raw gRPC bidirectional stream per iteration (GRPCInferenceServiceStub.ModelStreamInfer;
grpc is made gevent-friendly with init_gevent(), tritonclient's threaded stream helper is not used), sends the
clip's whole audio, then its frames (at most `--frames-per-request` per request, cut as latentsync-client cuts
them, at most `--max-inflight` frames not yet answered,
or paced at 25 fps with `--realtime`), and reads one response per finished window. Locust records:
  first_frame   time from opening the stream to the first synced frame (ms)
  window        time between consecutive window responses (ms; response_length = frames)
  stream        the whole stream (ms; response_length = frames); failures carry the server's message
Per-stream fps and first-frame latency are also summarised at the end (stdout and --summary-json).

Bounded and local by construction: the host must be a loopback address, each user stops after
`--streams-per-user` streams, and the run stops after `--max-run-seconds` whatever -t says.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import socket
import statistics
import time
from pathlib import Path

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from gevent.lock import Semaphore
from gevent.queue import Queue
from locust import User, events, task
from locust.exception import StopUser
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc

from latentsync_contract import MAX_UNANSWERED_FRAMES, UNANSWERED_REQUESTS, completes_window, request_spans

grpc_gevent.init_gevent()

MODEL = "lipsync"
MAX_MESSAGE = 256 << 20


@events.init_command_line_parser.add_listener
def _options(parser):
    g = parser.add_argument_group("lipsync")
    g.add_argument("--clip", required=True, help="video with a face (and its own audio unless --voice)")
    g.add_argument("--voice", default=None, help="16 kHz-decodable audio file (default: the clip's track)")
    g.add_argument("--clip-seconds", type=float, default=2.0, help="audio seconds per stream (sets the frames)")
    g.add_argument("--size", type=int, default=256, help="resize frames to this longer side (0: keep)")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=1.5)
    g.add_argument("--variant", default="1.5")
    g.add_argument("--frames-per-request", type=int, default=4)
    g.add_argument(
        "--max-inflight", type=int, default=36, help="frames sent but not yet answered (at most MAX_UNANSWERED_FRAMES)"
    )
    g.add_argument("--realtime", action="store_true", help="send frames at 25 fps, like a live source")
    g.add_argument("--streams-per-user", type=int, default=1)
    g.add_argument("--max-run-seconds", type=float, default=600.0)
    g.add_argument("--summary-json", default=None, help="write per-stream results here at the end")


# ---------------------------------------------------------------------------------------------------- media
class Clip:
    """The clip decoded once per process: frames (n, H, W, 3) uint8 and 16 kHz audio, n from the audio."""

    frames: np.ndarray
    audio: np.ndarray

    @classmethod
    def load(cls, opts) -> Clip:
        import cv2

        from latentsync_client import audio_chunks, frames_for_audio, num_frames_for_audio

        clip = cls()
        audio = np.concatenate(list(audio_chunks(opts.voice or opts.clip)))
        clip.audio = audio[: int(opts.clip_seconds * 16000)].astype(np.float32)
        frames = list(frames_for_audio(opts.clip, num_frames_for_audio(len(clip.audio))))
        h, w = frames[0].shape[:2]
        if opts.size and max(h, w) != opts.size:
            s = opts.size / max(h, w)
            size = (round(w * s) // 2 * 2, round(h * s) // 2 * 2)
            frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
        clip.frames = np.stack(frames)
        return clip


def _loopback(host: str) -> bool:
    """host:port, [v6]:port or a bare name/address, resolving only to loopback addresses."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(name, None))
    except (socket.gaierror, ValueError):
        return False


RESULTS: list[dict] = []


@events.test_start.add_listener
def _start(environment, **_):
    opts = environment.parsed_options
    if not environment.host or not _loopback(environment.host):
        raise SystemExit(f"locustfile: refusing host {environment.host!r}: load tests run on loopback only")
    environment.clip = Clip.load(opts)
    print(
        f"locustfile: clip {opts.clip}: {len(environment.clip.frames)} frames of "
        f"{environment.clip.frames.shape[2]}x{environment.clip.frames.shape[1]}",
        flush=True,
    )

    def deadline():
        gevent.sleep(opts.max_run_seconds)
        print(f"locustfile: stopping after --max-run-seconds {opts.max_run_seconds:g}", flush=True)
        environment.runner.quit()

    gevent.spawn(deadline)


@events.test_stop.add_listener
def _summary(environment, **_):
    ok = [r for r in RESULTS if r["error"] is None]
    summary = {"streams": len(RESULTS), "errors": len(RESULTS) - len(ok), "results": RESULTS}
    if ok:
        fps = [r["frames"] / r["seconds"] for r in ok]
        first = [r["first_frame_s"] for r in ok]
        summary.update(
            fps_mean=statistics.mean(fps),
            fps_min=min(fps),
            first_frame_mean_s=statistics.mean(first),
            first_frame_max_s=max(first),
        )
        print(
            f"locustfile: {len(ok)} streams ok, {summary['errors']} failed; per-stream fps mean "
            f"{summary['fps_mean']:.2f} (min {summary['fps_min']:.2f}); first frame mean "
            f"{summary['first_frame_mean_s']:.2f} s (max {summary['first_frame_max_s']:.2f} s)",
            flush=True,
        )
    else:
        print(f"locustfile: no stream completed ({len(RESULTS)} failed)", flush=True)
    path = environment.parsed_options.summary_json
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------- requests
def infer_request(
    request_id: str,
    sequence_id: int,
    frames: np.ndarray,
    audio: np.ndarray,
    *,
    start: bool,
    end: bool,
    params: dict | None = None,
) -> service_pb2.ModelInferRequest:
    r = service_pb2.ModelInferRequest(model_name=MODEL, id=request_id)
    r.parameters["sequence_id"].int64_param = sequence_id
    r.parameters["sequence_start"].bool_param = start
    r.parameters["sequence_end"].bool_param = end
    r.parameters["triton_enable_empty_final_response"].bool_param = True
    for key, value in (params or {}).items():
        if isinstance(value, str):
            r.parameters[key].string_param = value
        elif isinstance(value, float):
            r.parameters[key].double_param = value
        else:
            r.parameters[key].int64_param = value
    for name, array, dtype in (("FRAMES", frames, "UINT8"), ("AUDIO", audio, "FP32")):
        tensor = r.inputs.add(name=name, datatype=dtype)
        tensor.shape.extend(array.shape)
        r.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return r


class LipsyncUser(User):
    """One simulated client: streams the clip `--streams-per-user` times, one gRPC stream each."""

    _ids = itertools.count(1)

    def on_start(self):
        self.channel = grpc.insecure_channel(
            self.host,
            options=[("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)],
        )
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.done = 0

    def on_stop(self):
        self.channel.close()

    def fire(self, name: str, ms: float, length: int = 0, error: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="grpc-stream", name=name, response_time=ms, response_length=length, exception=error, context={}
        )

    @task
    def stream(self):
        opts = self.environment.parsed_options
        if self.done >= opts.streams_per_user:
            raise StopUser()
        self.done += 1
        result = self.run_stream(self.environment.clip, opts)
        RESULTS.append(result)
        error = RuntimeError(result["error"]) if result["error"] else None
        self.fire("stream", result["seconds"] * 1e3, result["frames"], error)
        if len(RESULTS) >= (opts.num_users or 1) * opts.streams_per_user:  # every user is done: end the run
            gevent.spawn_later(0.5, self.environment.runner.quit)

    def run_stream(self, clip: Clip, opts) -> dict:
        sequence_id = (next(self._ids) << 20) | (id(self) & 0xFFFFF)
        params = {"steps": opts.steps, "guidance": float(opts.guidance), "variant": opts.variant}
        outbox: Queue = Queue()
        credit = Semaphore(min(opts.max_inflight, MAX_UNANSWERED_FRAMES))  # more would fail the stream
        acks, acknowledged = Semaphore(UNANSWERED_REQUESTS), set()  # as latentsync-client: docs/PROTOCOL.md
        n = len(clip.frames)

        def put(request_id: str, frames: np.ndarray, audio: np.ndarray, paced: bool, **flags) -> None:
            """Queue a request; a `paced` one (audio, or frames completing no window) waits for an ack slot."""
            if paced:
                acks.acquire()
                acknowledged.add(request_id)
            outbox.put(infer_request(request_id, sequence_id, frames, audio, **flags))

        no_frames = np.zeros((0, *clip.frames.shape[1:]), np.uint8)
        no_audio = np.zeros((0,), np.float32)

        def produce():
            put(f"{sequence_id}-a", no_frames, clip.audio, True, start=True, end=False, params=params)
            t0 = time.perf_counter()
            for i, stop in request_spans(n, opts.frames_per_request):  # as latentsync-client cuts them
                batch = clip.frames[i:stop]
                for _ in range(len(batch)):
                    credit.acquire()
                if opts.realtime:
                    gevent.sleep(max(0.0, t0 + i / 25 - time.perf_counter()))
                put(f"{sequence_id}-{i}", batch, no_audio, not completes_window(stop, n), start=False, end=stop == n)
            outbox.put(None)

        start = last = time.perf_counter()
        result = {"frames": 0, "first_frame_s": None, "seconds": 0.0, "error": None}
        producer = gevent.spawn(produce)
        # The server closes the stream once the request side is closed (after the last request) and every
        # response, the final empty ones included, was sent.
        call = self.stub.ModelStreamInfer(iter(outbox.get, None), timeout=opts.max_run_seconds)
        try:
            for response in call:
                if response.error_message:
                    raise RuntimeError(response.error_message)
                reply, key = response.infer_response, "triton_final_response"
                if key in reply.parameters and reply.parameters[key].bool_param and reply.id in acknowledged:
                    acknowledged.discard(reply.id)
                    acks.release()
                indices = InferResult(response.infer_response).as_numpy("FRAME_INDEX")
                got = 0 if indices is None else len(indices)
                if not got:
                    continue
                now = time.perf_counter()
                if result["first_frame_s"] is None:
                    result["first_frame_s"] = now - start
                    self.fire("first_frame", (now - start) * 1e3, got)
                else:
                    self.fire("window", (now - last) * 1e3, got)
                last = now
                result["frames"] += got
                for _ in range(got):
                    credit.release()
            if result["frames"] != n:
                raise RuntimeError(f"stream ended after {result['frames']} of {n} frames")
        except (grpc.RpcError, RuntimeError) as e:
            result["error"] = e.details() if isinstance(e, grpc.RpcError) else str(e)
            call.cancel()
        finally:
            producer.kill()
        result["seconds"] = time.perf_counter() - start
        return result
