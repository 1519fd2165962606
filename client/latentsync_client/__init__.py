"""Thin client of the LatentSync Triton deployment: PyAV decode/encode + one gRPC stream (no torch).

from latentsync_client import LipsyncClient, StreamParams, sync_file
sync_file("face.mp4", "voice.wav", "out.mp4", client=LipsyncClient("gpu-host:8001"))

client = LipsyncClient("gpu-host:8001")
for synced in client.stream(audio_16k_mono, frames_25fps_rgb, StreamParams(steps=20)):
    use(synced.index, synced.frame, synced.face_found)
"""

from latentsync_contract import FPS, SAMPLE_RATE, StreamParams, num_frames_for_audio

from .errors import (
    ClientError,
    InputError,
    Interrupted,
    NoFaceError,
    OutputError,
    ServerBusy,
    ServerError,
    ServerUnreachable,
    StreamExpired,
)
from .media import audio_chunks, frames_25fps, frames_for_audio, ping_pong_index
from .stream import LipsyncClient, SyncedFrame
from .sync import SyncResult, sync_file
from .writer import SyncedVideoWriter

__all__ = [
    "LipsyncClient",
    "StreamParams",
    "SyncedFrame",
    "SyncResult",
    "SyncedVideoWriter",
    "sync_file",
    "audio_chunks",
    "frames_25fps",
    "frames_for_audio",
    "ping_pong_index",
    "num_frames_for_audio",
    "FPS",
    "SAMPLE_RATE",
    "ClientError",
    "InputError",
    "ServerUnreachable",
    "ServerBusy",
    "ServerError",
    "NoFaceError",
    "StreamExpired",
    "OutputError",
    "Interrupted",
]
