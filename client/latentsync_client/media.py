"""Decoding inputs with PyAV, streaming and in constant memory.

* Audio: any file with an audio track -> 16 kHz mono float32 chunks, resampled by libswresample to s16 and
  scaled by 1/32768, which is what upstream's whisper `load_audio` (`ffmpeg -ac 1 -ar 16000 -f s16le`) feeds
  the encoder.
* Video: any file with a video stream (HEVC, h264, ..., any fps, a still image) -> RGB uint8 frames at 25 fps,
  upright, converted from YUV as upstream's OpenCV converts them (BT.601, whatever the file's tag). Upstream
  re-encodes with `ffmpeg -r 25`; here the same source frames are kept, duplicated or dropped as FFmpeg's
  constant-frame-rate sync does (frame_rate.py), without the re-encode.
* Length: the audio sets the frame count. A longer video is cut; a shorter one (or a photo) loops ping-pong
  (forward, reversed, forward, ...) as upstream's `loop_video` does. Frames to replay are spilled to an
  unlinked temporary file on disk, so memory does not grow with the video's length.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from latentsync_contract import FPS, SAMPLE_RATE, ContractError, check_frame_size

from .errors import InputError
from .frame_rate import ConstantRateSync, start_offset

# FFmpeg demuxers that render any text file as "video": never what a user meant.
TEXT_ART_FORMATS = {"tty", "bin", "xbin", "adf", "idf"}


def open_media(path: str | os.PathLike) -> av.container.InputContainer:
    """Open an input file, turning PyAV's many failure types into one InputError that names the file."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: unsupported or unreadable media file ({e})") from None
    if container.format.name in TEXT_ART_FORMATS:
        container.close()
        raise InputError(f"{path}: unsupported file (text, not audio or video)")
    return container


def _decode_error(path, e: Exception) -> InputError:
    return InputError(f"{path}: cannot decode ({e})")


def check_inputs(video: str | os.PathLike, audio: str | os.PathLike) -> None:
    """Fail early (InputError) unless `video` has a video stream (of a frame size the server takes)
    and `audio` an audio track."""
    for path, kind in ((video, "video"), (audio, "audio")):
        with open_media(path) as container:
            streams = getattr(container.streams, kind)
            if not streams:
                raise InputError(f"{path}: has no {'video stream' if kind == 'video' else 'audio track'}")
            if streams[0].codec_context is None:  # FFmpeg has no decoder for this codec
                raise InputError(f"{path}: unsupported {kind} codec (no decoder for it)")
            ctx = streams[0].codec_context
            if kind == "video" and ctx.width and ctx.height:
                try:
                    check_frame_size(ctx.height, ctx.width)
                except ContractError as e:
                    raise InputError(f"{path}: the server would refuse it: {e}") from None


# ------------------------------------------------------------------------------------------------------ audio
def audio_chunks(path: str | os.PathLike, chunk_samples: int = 10 * SAMPLE_RATE) -> Iterator[np.ndarray]:
    """The first audio track of `path` as 16 kHz mono float32 chunks of `chunk_samples` (the last may be short)."""
    with open_media(path) as container:
        if not container.streams.audio:
            raise InputError(f"{path}: has no audio track")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        pending, n_pending = [], 0
        try:
            for frame in _with_flush(container.decode(stream)):
                for out in resampler.resample(frame):
                    pending.append(out.to_ndarray().reshape(-1))
                    n_pending += out.samples
                while n_pending >= chunk_samples:
                    merged = np.concatenate(pending)
                    yield merged[:chunk_samples].astype(np.float32) / 32768.0
                    pending, n_pending = [merged[chunk_samples:]], n_pending - chunk_samples
        except av.FFmpegError as e:
            raise _decode_error(path, e) from None
        if n_pending:
            yield np.concatenate(pending).astype(np.float32) / 32768.0


def _with_flush(frames):
    """Decoded frames followed by None, the resampler's flush signal."""
    yield from frames
    yield None


# ------------------------------------------------------------------------------------------------------ video
DECODE_MATRIX = "ITU601"  # upstream reads frames with OpenCV, whose FFmpeg conversion is BT.601 whatever the tag


@dataclass(frozen=True)
class ColourTags:
    """A video's colour description (FFmpeg's AVCOL_* codes): what the output is tagged with, so that it shows
    as its source does."""

    matrix: int
    primaries: int
    transfer: int


BT601 = ColourTags(matrix=6, primaries=6, transfer=6)  # SMPTE 170M: the matrix frames are converted with here
RGB_MATRIX, UNSPECIFIED = 0, 2


def colour_tags(path: str | os.PathLike) -> ColourTags:
    """The first video stream's colour tags, to give the output: frames are converted to RGB and back with BT.601
    (as upstream's cv2 and imageio do), so the output's YUV is the source's and, tagged as the source is (or not
    tagged, where the source is not), it shows as the source does. RGB sources (a PNG) and JPEG's full-range
    YUV, BT.601 by definition, get BT.601's tags."""
    with open_media(path) as container:
        if not container.streams.video:
            raise InputError(f"{path}: has no video stream")
        ctx = container.streams.video[0].codec_context
        tags = ColourTags(int(ctx.colorspace), int(ctx.color_primaries), int(ctx.color_trc))
        pix_fmt = av.VideoFormat(ctx.pix_fmt) if ctx.pix_fmt else None
    if pix_fmt is None or pix_fmt.is_rgb or pix_fmt.has_palette or tags.matrix == RGB_MATRIX:
        return BT601  # RGB pixels, whatever a tag says: the output's YUV is made with BT.601
    if tags.matrix == UNSPECIFIED and (pix_fmt.name.startswith(("yuvj", "gray"))):
        return BT601  # JPEG's YUV is BT.601 by definition; grey has no matrix to keep
    return tags


def _upright(frame: av.VideoFrame) -> np.ndarray:
    """RGB array as upstream's OpenCV reads the frame (BT.601 YUV -> RGB, whatever the file's tag: 0.5-1.3 levels
    apart on average from the tagged or HD matrix on the demo clips, 3-5 at the 99th percentile, on skin most),
    upright as the file is meant to be shown: display-matrix / EXIF rotation applied (flips are not)."""
    rgb = frame.reformat(format="rgb24", src_colorspace=DECODE_MATRIX).to_ndarray()
    quarter_turns = round(frame.rotation / 90) % 4  # counter-clockwise, as np.rot90 turns
    if quarter_turns:
        rgb = np.ascontiguousarray(np.rot90(rgb, quarter_turns))
    rgb.flags.writeable = False  # duplicates share it
    return rgb


def frames_25fps(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Upright RGB uint8 frames of the first video stream at 25 fps: the source frames that upstream's `ffmpeg -r 25`
    re-encode writes, each as many times (frame_rate.ConstantRateSync). A repeated frame is the same (read-only)
    array; a dropped frame is never converted."""
    with open_media(path) as container:
        if not container.streams.video:
            raise InputError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.guessed_rate or stream.average_rate
        sync = ConstantRateSync(FPS, single_stream=len(container.streams) == 1, frame_rate=rate)
        default_duration = 1 / Fraction(rate or FPS)
        previous = current = None  # [frame, its RGB once converted]
        last_t: Fraction | None = None
        offset = start_offset(container.start_time, stream.time_base) if stream.time_base else 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None or frame.time_base is None:  # no timestamp: one frame after the last
                    t = Fraction(0) if last_t is None else last_t + default_duration
                    duration = default_duration
                else:
                    t = Fraction(frame.pts + offset) * frame.time_base  # decoded frames keep the stream's time base
                    duration = Fraction(frame.duration) * frame.time_base if frame.duration else None
                last_t = t
                previous, current = current, [frame, None]
                n_previous, n = sync.push(t, duration)
                for k in range(n):
                    yield _rgb(previous if k < n_previous and previous is not None else current)
        except av.FFmpegError as e:
            raise _decode_error(path, e) from None
        if current is None:
            raise InputError(f"{path}: no video frames could be decoded")
        for _ in range(sync.flush()):
            yield _rgb(current)


def _rgb(shown: list) -> np.ndarray:
    """The RGB array of a [frame, RGB or None] pair, converted on first use."""
    if shown[1] is None:
        shown[1] = _upright(shown[0])
    return shown[1]


def declared_duration(path: str | os.PathLike) -> float | None:
    """Duration in seconds the container claims for its first video stream (None if it does not say)."""
    with open_media(path) as container:
        if not container.streams.video:
            raise InputError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        return container.duration / av.time_base if container.duration else None


class FrameSpill:
    """Equal-sized frames appended to an unlinked temporary file and read back by index.

    Plain file I/O (not mmap), so replayed frames live in the OS page cache, not in this process.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self._file = tempfile.TemporaryFile(prefix="latentsync-frames-", dir=directory)
        self.shape: tuple[int, ...] | None = None
        self.count = 0

    def append(self, frame: np.ndarray) -> None:
        if self.shape is None:
            self.shape = frame.shape
        elif frame.shape != self.shape:
            raise InputError(f"video frame size changed from {self.shape[:2]} to {frame.shape[:2]} mid-stream")
        self._file.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        self.count += 1

    def read(self, index: int) -> np.ndarray:
        frame = np.empty(self.shape, np.uint8)
        self._file.flush()
        n = os.preadv(self._file.fileno(), [memoryview(frame).cast("B")], index * frame.nbytes)
        if n != frame.nbytes:
            raise OSError(f"frame spill file truncated at frame {index}")
        return frame

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ping_pong_index(j: int, n: int) -> int:
    """Source frame of output frame j when n frames loop forward, reversed, forward, ... (upstream loop_video)."""
    loop, r = divmod(j, n)
    return r if loop % 2 == 0 else n - 1 - r


def frames_for_audio(
    path: str | os.PathLike, n_frames: int, spill_dir: str | os.PathLike | None = None
) -> Iterator[np.ndarray]:
    """Exactly `n_frames` upright 25 fps frames of `path`: cut if longer, looped ping-pong if shorter.

    Frames are spilled to disk only when the container's declared duration says the video may be too short
    (a file that lied is decoded a second time to fill the spill).
    """
    duration = declared_duration(path)
    may_loop = duration is None or duration * FPS < n_frames + 1
    with FrameSpill(spill_dir) as spill:
        count = 0
        for frame in frames_25fps(path):
            if count == n_frames:
                return
            if may_loop:
                spill.append(frame)
            yield frame
            count += 1
        if count == n_frames:
            return
        if not may_loop:
            for frame in frames_25fps(path):
                spill.append(frame)
        for j in range(count, n_frames):
            yield spill.read(ping_pong_index(j, spill.count))
