"""Helpers shared by the test modules: media files, the CLI, raw gRPC streams to `lipsync`, server metrics.

Fixtures live in conftest.py; this module holds plain functions the tests import by name.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import tritonclient.grpc as grpcclient

from latentsync_client import audio_chunks, num_frames_for_audio
from latentsync_contract import (
    AUDIO,
    FACE_FOUND,
    FRAME_INDEX,
    FRAMES,
    MODEL_NAME,
    REGION_BOX,
    REGIONS,
    STREAM_TOKEN,
    WINDOW,
    apply_regions,
)
from latentsync_export.manifest import load_reference

_ids = itertools.count(1000)


# ---------------------------------------------------------------------------------------------------- stubs
class NoMetricsPb:
    """pb_utils without metric families or logging: what DenoiserService touches before any request."""

    class Logger:
        @staticmethod
        def log_info(text):
            pass

        log_warn = log_error = log_info


class LipsyncPb:
    """pb_utils as the lipsync service uses it, without a server (errors are kept as text)."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class TritonError:
        def __init__(self, message):
            self.text = message

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.error = error

    class Tensor:
        def __init__(self, array):
            self.array = array

        def as_numpy(self):
            return self.array

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.tensors.get(name)


class LipsyncSender:
    """A request's response sender that records what was sent."""

    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return False

    def errors(self) -> list[str]:
        return [r.error.text for r, _ in self.sent if r is not None and r.error is not None]


class LipsyncRequest:
    """A lipsync request with tiny FRAMES and silent AUDIO of the given lengths."""

    def __init__(self, stream_id, flags=0, token="A", frames=0, audio=0):
        self.stream_id, self.flags_, self.sender = stream_id, flags, LipsyncSender()
        self.tensors = {}
        if frames:
            self.tensors["FRAMES"] = LipsyncPb.Tensor(np.zeros((frames, 4, 4, 3), np.uint8))
        if audio:
            self.tensors["AUDIO"] = LipsyncPb.Tensor(np.zeros(audio, np.float32))
        self.params = json.dumps({STREAM_TOKEN: token} if token else {})

    def correlation_id(self):
        return self.stream_id

    def flags(self):
        return self.flags_

    def parameters(self):
        return self.params

    def get_response_sender(self):
        return self.sender


# ---------------------------------------------------------------------------------------------------- media
CODE_STEP = 7  # frame i is a flat grey of level i * CODE_STEP: decodable after lossy coding


def write_clip(path, n_frames, fps=25, size=(48, 64), rotation=0, frames=None, times=None, audio=False):
    """An h264 clip whose frame i is flat grey i * CODE_STEP (or the given RGB frames), nearly lossless.

    `times`: frame i's presentation time in seconds (Fractions, any spacing: a variable frame rate, a late start),
    else i / fps. `audio`: a silent AAC track from 0 to the video's end, so the file starts before a late video."""
    h, w = size
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 90000)
        if rotation:
            stream.set_display_rotation(rotation)
        track = out.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i in range(n_frames):
            rgb = frames[i] if frames is not None else np.full((h, w, 3), i * CODE_STEP % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 90000), Fraction(1, 90000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if track is not None:
            end = (times[-1] if times is not None else Fraction(n_frames - 1) / rate) + 1 / rate
            silence = av.AudioFrame.from_ndarray(
                np.zeros((1, math.ceil(end * 16000)), np.float32), format="fltp", layout="mono"
            )
            silence.sample_rate, silence.pts, silence.time_base = 16000, 0, Fraction(1, 16000)
            out.mux(track.encode(silence))
            out.mux(track.encode())
    return Path(path)


def write_wav(path, samples, rate=16000):
    """PCM16 wav of float samples in [-1, 1], shape (n,) or (channels, n)."""
    samples = np.atleast_2d(samples)
    layout = "mono" if len(samples) == 1 else "stereo"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout=layout)
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)  # packed s16
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        frame.rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return Path(path)


def frame_codes(frames):
    """Source index of each index-coded frame."""
    return [int(round(float(f.mean()) / CODE_STEP)) for f in frames]


def decode(path: Path, scale: float = 1.0, step: int = 1, limit: int | None = None) -> np.ndarray:
    """RGB frames of a clip, resized by PyAV's scaler (cheap detection at reduced cost)."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        w, h = stream.codec_context.width, stream.codec_context.height
        size = dict(width=int(w * scale) // 2 * 2, height=int(h * scale) // 2 * 2)
        for i, frame in enumerate(container.decode(stream)):
            if i % step == 0:
                frames.append(frame.to_ndarray(format="rgb24", **size))
            if limit and len(frames) >= limit:
                break
    return np.stack(frames)


# ---------------------------------------------------------------------------------------------------- CLI
ECHO_MODEL = Path(__file__).parent / "models" / "protocol_echo"
CLI = [str(Path(sys.executable).with_name("latentsync-client"))]
FAST = ["--preset", "ultrafast", "-q"]


def echo_repository(
    root: Path, window_delay_s: float = 0.0, variants: str = "1.5,1.6", idle_timeout_s: float = 60.0
) -> Path:
    """A model repository whose `lipsync` is the protocol echo double, with its test knobs set."""
    shutil.copytree(ECHO_MODEL, root / "lipsync")
    config = root / "lipsync" / "config.pbtxt"
    text = config.read_text()
    text = text.replace(
        "max_sequence_idle_microseconds: 60000000", f"max_sequence_idle_microseconds: {int(idle_timeout_s * 1e6)}"
    )
    text = text.replace(
        'key: "window_delay_s" value { string_value: "0" }',
        f'key: "window_delay_s" value {{ string_value: "{window_delay_s}" }}',
    )
    text = text.replace('string_value: "1.5,1.6"', f'string_value: "{variants}"')
    config.write_text(text)
    return root


def run_cli(*args, timeout=120):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def audio_samples(path) -> int:
    return sum(len(c) for c in audio_chunks(path))


def probe(path: Path) -> dict:
    """What a player sees: video frames, rate, duration; audio codec and duration."""
    with av.open(str(path)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        info = dict(
            fps=video.average_rate,
            size=(video.height, video.width),
            codec=video.codec_context.name,
            duration=float(video.duration * video.time_base),
            audio_codec=audio.codec_context.name,
            audio_duration=float(audio.duration * audio.time_base),
        )
        info["frames"] = [f.to_ndarray(format="rgb24") for f in c.decode(video)]
    return info


def assert_synced_output(out: Path, audio: Path, tmp_dir: Path):
    """Frame count from the audio (PROTOCOL.md), 25 fps, matching duration, AAC audio trimmed to the video."""
    n = num_frames_for_audio(audio_samples(audio))
    info = probe(out)
    assert (info["codec"], info["fps"], len(info["frames"])) == ("h264", 25, n)
    assert abs(info["duration"] - n / 25) < 1e-6
    assert info["audio_codec"] == "aac"
    with av.open(str(audio)) as c:
        source_seconds = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    assert abs(info["audio_duration"] - min(source_seconds, n / 25)) < 0.05
    assert [p.name for p in tmp_dir.iterdir() if ".partial" in p.name] == []
    return info


def cut_audio(src: Path, dst: Path, seconds: float) -> Path:
    samples = np.concatenate(list(audio_chunks(src)))
    return write_wav(dst, samples[: int(seconds * 16000)])


# ---------------------------------------------------------------------------------------------------- streams
def audio_for(samples: np.ndarray, n_frames: int) -> np.ndarray:
    """The shortest prefix of the track that covers n_frames video frames (upstream's frame count)."""
    n = n_frames * 640
    while num_frames_for_audio(n) < n_frames:
        n += 160
    return np.ascontiguousarray(samples[:n], np.float32)


# ---------------------------------------------------------------------------------------------------- client
@dataclass
class StreamResult:
    frames: list = field(default_factory=list)
    indices: list = field(default_factory=list)
    found: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def video(self) -> np.ndarray:
        return np.concatenate(self.frames)


DTYPES = {np.uint8: "UINT8", np.float32: "FP32", np.float64: "FP64", np.int32: "INT32"}


class OpenStream:
    """One gRPC stream to `lipsync`, open until closed: `send` puts any request on it (no client checks), `collect`
    waits for final responses; the synced frames (the regions that came back pasted into copies of the frames
    that were sent) gather in `result`."""

    def __init__(self, url: str):
        self.client, self.replies = grpcclient.InferenceServerClient(url), queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.replies.put((result, error)))
        self.result, self.sent = StreamResult(), 0
        self.sent_frames: list[np.ndarray] = []  # every frame sent, by stream index

    def send(
        self,
        tensors: dict[str, np.ndarray],
        sequence_id: int,
        start: bool = False,
        end: bool = False,
        parameters: dict | None = None,
    ) -> None:
        inputs = []
        for name, array in tensors.items():
            inputs.append(grpcclient.InferInput(name, list(array.shape), DTYPES[array.dtype.type]))
            inputs[-1].set_data_from_numpy(array)
        if FRAMES in tensors and tensors[FRAMES].ndim == 4:
            self.sent_frames.extend(tensors[FRAMES])
        self.client.async_stream_infer(
            MODEL_NAME,
            inputs,
            request_id=str(self.sent),
            sequence_id=sequence_id,
            sequence_start=start,
            sequence_end=end,
            enable_empty_final_response=True,
            parameters=parameters,
        )
        self.sent += 1

    def collect(self, n_finals: int, timeout: float = 600.0) -> list[str]:
        """Replies until `n_finals` requests completed, in arrival order: 'data', 'final' or the error text."""
        got, finals = [], 0
        while finals < n_finals:
            reply, error = self.replies.get(timeout=timeout)
            if error is not None:
                got.append(str(error))
                self.result.errors.append(str(error))
                finals += 1
                continue
            response = reply.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if response.outputs:
                index = reply.as_numpy(FRAME_INDEX)
                frames = np.stack([self.sent_frames[i] for i in index])  # copies
                apply_regions(frames, reply.as_numpy(REGION_BOX), reply.as_numpy(REGIONS))
                self.result.frames.append(frames)
                self.result.indices.append(index)
                self.result.found.append(reply.as_numpy(FACE_FOUND))
            got.append("final" if final else "data")
            finals += final
        return got

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()

    def __enter__(self) -> OpenStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_stream(
    url: str,
    frames: np.ndarray,
    audio: np.ndarray,
    params: dict | None,
    sequence_id: int | None = None,
    timeout: float = 600.0,
    start: bool = True,
    end: bool = True,
) -> StreamResult:
    """One stream per docs/PROTOCOL.md: whole audio first (sequence_start), then frames in windows of 16."""
    sequence_id = sequence_id or next(_ids)
    h, w = frames.shape[1:3] if len(frames) else (8, 8)
    requests = [(np.zeros((0, h, w, 3), np.uint8), audio)] if audio is not None else []
    requests += [
        (np.ascontiguousarray(frames[i : i + WINDOW]), np.zeros(0, np.float32)) for i in range(0, len(frames), WINDOW)
    ]
    with OpenStream(url) as stream:
        for i, (f, a) in enumerate(requests):
            first, last = i == 0 and start, i == len(requests) - 1 and end
            stream.send({FRAMES: f, AUDIO: a}, sequence_id, first, last, params if first and params else None)
        stream.collect(len(requests), timeout)
    return stream.result


def reference_video(repo, variant, frames, audio, **params) -> np.ndarray:
    pipeline = load_reference(repo, variant)
    return np.concatenate([w.frames for w in pipeline(frames, audio, **params)])


def metric(server, name: str, default: float | None = None, **labels: str) -> float:
    """The sum of a Prometheus metric over the series whose labels include `labels` (`default` if none);
    `server`: a TritonServer or its metrics URL."""
    text = urllib.request.urlopen(getattr(server, "metrics_url", server), timeout=10).read().decode()
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    ]
    assert values or default is not None, f"metric {name} {labels or ''} not exported"
    return sum(values) if values else default


def children_of(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def server_memory_mb(server) -> dict[str, float]:
    """Anonymous resident memory (RssAnon: shared memory not counted) of tritonserver and of each Python backend
    stub by model name, and each stub's shared-memory pool as 'shm:<model>' (pages allocated in /dev/shm), in MB."""
    memory = {}
    for pid in [server.pid, *children_of(server.pid)]:
        try:
            anon = re.search(r"RssAnon:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        name = "tritonserver" if pid == server.pid else Path(argv[1]).parts[-3]  # REPO/<model>/1/model.py
        memory[name] = int(anon) / 1024
        if pid != server.pid:  # argv[2]: the stub's shm region
            memory[f"shm:{name}"] = os.stat(f"/dev/shm/{argv[2]}").st_blocks * 512 / 2**20
    return memory


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def run_gpu_script(tmp_path: Path, shared_dir: Path, *args: str, timeout: float = 900) -> dict:
    """latentsync-gpu-bench --tiny (the CPU dry run) on 2 real face frames; its JSON report."""
    from latentsync_load.gpu_bundle import write_face_frames

    frames = tmp_path / "frames"
    write_face_frames(shared_dir / "media" / "demo1_video.mp4", frames, count=2)
    cmd = [sys.executable, "-m", "latentsync_load.gpu_bench", "--tiny", "--frames", str(frames)]
    subprocess.run([*cmd, "--out", str(tmp_path / "out"), *args], check=True, timeout=timeout, capture_output=True)
    return json.loads((tmp_path / "out" / "gpu_bench.json").read_text())


# Triton's Python backend now and then aborts tritonserver while it loads several Python models at once
# ("terminate called after throwing an instance of 'boost::interprocess::lock_exception'", SIGABRT; open upstream as
# triton-inference-server/server#8882). Seen once in ~40 server starts of a CI run (test_triton_options, fresh clone
# of dcf6058); that module passed on the runs before and after. None of our code runs in tritonserver's process.
UPSTREAM_LOAD_ABORT = "boost::interprocess::lock_exception"


def start_ready(new_server, timeout: float):
    """Start `new_server()` and wait until it is ready; if it died of the upstream abort above while loading,
    start one more (with a warning). Any other failure, or a second abort, raises."""
    for attempt in (1, 2):
        server = new_server()
        try:
            return server.start().wait_ready(timeout)
        except RuntimeError:  # exited before it was ready
            if attempt == 2 or UPSTREAM_LOAD_ABORT not in server.log_tail():
                raise
            server.stop()
            message = f"tritonserver aborted while loading ({UPSTREAM_LOAD_ABORT}); started once more"
            warnings.warn(message, stacklevel=2)


# Y = 2 * X: the smallest Python model, for tests of the server around the models
DOUBLE_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() * 2)]) for r in requests]
"""


def write_python_model(
    repo: Path,
    name: str,
    code: str,
    output_type: str = "TYPE_FP32",
    input_spec: str = 'name: "X" data_type: TYPE_FP32 dims: [ -1 ]',
    output_spec: str | None = None,
) -> None:
    """A one-instance CPU Python model `name` in `repo`: its model.py and config (input X, output Y by default)."""
    output_spec = output_spec or f'name: "Y" data_type: {output_type} dims: [ -1 ]'
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))
    (repo / name / "config.pbtxt").write_text(
        textwrap.dedent(f"""
        backend: "python"
        max_batch_size: 0
        input [ {{ {input_spec} }} ]
        output [ {{ {output_spec} }} ]
        instance_group [ {{ count: 1 kind: KIND_CPU }} ]
    """)
    )
