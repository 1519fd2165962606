"""File to file: decode a video (or photo) and a voice track, stream them through `lipsync`, write OUT."""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from latentsync_contract import FPS, StreamParams

from .errors import DISK_ERRORS, InputError, NoFaceError, OutputError
from .media import audio_chunks, check_inputs, colour_tags, frames_for_audio
from .stream import LipsyncClient
from .writer import SyncedVideoWriter

Progress = Callable[[int, int], None]  # (frames done, frames in total)


def prefetch(items: Iterable, depth: int = 8) -> Iterator:
    """Iterate `items` on a background thread, at most `depth` ahead (decoding overlaps sending and encoding;
    PyAV releases the GIL while it decodes and converts). Errors are re-raised here; closing stops the thread."""
    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((done, None))
        except BaseException as e:  # handed to the consumer, raised there
            buffer.put((done, e))
        finally:
            close = getattr(items, "close", None)
            if close:
                close()

    thread = threading.Thread(target=produce, name="latentsync-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class SyncResult:
    output: str
    frames: int  # frames written (at 25 fps)
    frames_without_face: int  # frames the server passed through unchanged
    seconds: float  # wall time

    @property
    def duration(self) -> float:
        return self.frames / FPS


def check_output(output: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """InputError if writing `output` would overwrite one of the `inputs` (the same file, by any path)."""
    for path in inputs:
        if os.path.exists(output) and os.path.samefile(output, path):
            raise InputError(f"{output}: is the input {path} itself; choose another output file")


def check_spill_dir(spill_dir: str | os.PathLike | None) -> None:
    if spill_dir is None:
        return
    try:
        tempfile.TemporaryFile(dir=spill_dir).close()
    except OSError as e:
        raise InputError(f"{spill_dir}: cannot keep looped frames there ({e.strerror})") from None


def sync_file(
    video: str | os.PathLike,
    audio: str | os.PathLike,
    output: str | os.PathLike,
    *,
    client: LipsyncClient | None = None,
    params: StreamParams | None = None,
    progress: Progress | None = None,
    require_face: bool = True,
    crf: int = 18,
    preset: str = "medium",
    threads: int = 0,
    spill_dir: str | os.PathLike | None = None,
) -> SyncResult:
    """Lip-sync `video` (any video file, or a still image) to the audio track of `audio`; write `output`.

    Memory stays flat in the video's length: frames are decoded, sent, received and encoded as a stream.
    `output` appears only on success (NoFaceError if no frame had a face and `require_face`; with
    `require_face=False` the output is then the input frames, re-timed). Inputs, output, encoder options and
    spill folder are checked before connecting; a full disk raises OutputError.
    """
    client = client or LipsyncClient()
    params = params or StreamParams()
    started = time.monotonic()
    check_inputs(video, audio)  # fail fast, before any network or decoding work
    check_output(output, video, audio)
    check_spill_dir(spill_dir)
    without_face = 0
    try:
        # the writer creates its file now, and refuses encoder options x264 would not take
        colour = colour_tags(video)  # the output shows as the source does
        with SyncedVideoWriter(output, audio, crf=crf, preset=preset, threads=threads, colour=colour) as writer:
            client.check()

            def source_frames(n_frames: int):  # called once the audio is sent and the frame count known
                writer.n_frames = n_frames
                if progress:
                    progress(0, n_frames)
                return prefetch(frames_for_audio(video, n_frames, spill_dir))

            try:
                with contextlib.closing(client.stream(audio_chunks(audio), source_frames, params)) as synced:
                    for out in synced:
                        writer.write(out.frame)
                        without_face += not out.face_found
                        if progress:
                            progress(writer.frames_written, writer.n_frames)
            except NoFaceError:  # the server's end-of-stream verdict, after every frame came back
                if require_face or not writer.frames_written or writer.frames_written != writer.n_frames:
                    raise
            if require_face and without_face == writer.frames_written:
                raise NoFaceError(f"no face found in any of the {without_face} frames of {video}")
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise OutputError(f"cannot write {e.filename or output}: {e.strerror}") from None
        raise
    return SyncResult(str(output), writer.frames_written, without_face, time.monotonic() - started)
