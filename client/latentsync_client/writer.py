"""Encoding synced frames as they arrive: h264 video muxed with the original audio (AAC), written to a
temporary file beside the output and renamed onto it only when everything succeeded.

The temporary file (`.NAME.partial-PID-XXXXXX.EXT`) is created, and locked with flock, when the writer opens,
so an unwritable folder shows before any work is done. Its writer holds the lock until the file is renamed or
deleted; a partial file nobody holds was left by a writer that was killed (SIGKILL, power loss), and the next
writer in that folder deletes it (only its own user's files, only unlocked ones: a lock, unlike a pid, cannot
belong to an unrelated process that reused the pid).
"""

from __future__ import annotations

import errno
import numbers
import os
import re
import secrets
import stat
from pathlib import Path

import av
import numpy as np

from latentsync_contract import FPS

from .errors import DISK_ERRORS, InputError, OutputError
from .media import BT601, DECODE_MATRIX, ColourTags, open_media

try:
    import fcntl
except ImportError:  # Windows: no locks, so no clean-up of stale partial files either
    fcntl = None

AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


class _AudioSource:
    """The original audio track, decoded lazily and resampled to what the AAC encoder takes (fltp, the
    source rate where AAC allows it, mono or stereo), handed out in exact sample counts."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self._container = open_media(path)
        if not self._container.streams.audio:
            self._container.close()
            raise InputError(f"{path}: has no audio track")
        stream = self._container.streams.audio[0]
        rate = stream.rate if stream.rate in AAC_RATES else 48000
        self.layout = "stereo" if stream.channels >= 2 else "mono"
        self.rate = rate
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=rate)
        self._frames = self._decode(stream)
        self._fifo = av.AudioFifo()
        self._exhausted = False

    def _decode(self, stream):
        try:
            for frame in self._container.decode(stream):
                yield from self._resampler.resample(frame)
            yield from self._resampler.resample(None)
        except av.FFmpegError as e:
            raise InputError(f"{self.path}: cannot decode the audio ({e})") from None

    def read(self, n: int) -> av.AudioFrame | None:
        """Up to n samples (fewer only at the end of the track), or None when it is over."""
        while self._fifo.samples < n and not self._exhausted:
            frame = next(self._frames, None)
            if frame is None:
                self._exhausted = True
            else:
                frame.pts = None
                self._fifo.write(frame)
        return self._fifo.read(min(n, self._fifo.samples)) if self._fifo.samples else None

    def close(self) -> None:
        self._container.close()


X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
MAX_CRF = 51  # 8-bit x264
MAX_THREADS = 128  # x264's X264_THREAD_MAX


LIMITED_RANGE = 1  # FFmpeg's AVCOL_RANGE_MPEG


def check_encoder_options(crf: float, preset: str, threads: int) -> None:
    """InputError unless x264 takes these (found before any connection, not at the first frame). Presets as x264
    reads them: a name in any case, or its number 0 (ultrafast) .. 9 (placebo)."""
    if not isinstance(preset, str) or (preset.lower() not in X264_PRESETS and preset not in map(str, range(10))):
        raise InputError(f"x264 preset {preset!r} is not one of {', '.join(X264_PRESETS)} (or 0..9)")
    if isinstance(crf, bool) or not isinstance(crf, numbers.Real) or not 0 <= crf <= MAX_CRF:
        raise InputError(f"x264 crf {crf!r} is not a number in 0..{MAX_CRF}")
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 0 <= threads <= MAX_THREADS:
        raise InputError(
            f"encoder threads {threads!r} is not a whole number in 0..{MAX_THREADS} (0 = as many as suit the cores)"
        )


PARTIAL_NAME = re.compile(r"^\..*\.partial-\d+-[0-9a-f]{6}(\.[^./]*)?$")


def claim_partial(path: Path) -> tuple[Path, int | None]:
    """A new temporary file beside `path` and a descriptor holding its lock (None without fcntl)."""
    while True:
        tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}-{secrets.token_hex(3)}{path.suffix}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
        if fcntl is None:
            return tmp, fd
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a clean-up looks at the new file
        try:
            if os.stat(tmp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:  # the clean-up took it for a stale one: try another name
            pass
        os.close(fd)


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete this user's partial files in `folder` that no writer holds (left by killed writers)."""
    removed = []
    if fcntl is None:
        return removed
    for path in folder.iterdir():
        if not PARTIAL_NAME.match(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_uid == os.getuid() and stat.S_ISREG(st.st_mode):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
                if os.stat(path, follow_symlinks=False).st_ino == st.st_ino:
                    path.unlink()
                    removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


class SyncedVideoWriter:
    """Writes `n_frames` RGB frames at 25 fps plus the audio of `audio_path` trimmed to n_frames / 25 s.

    Use as a context manager: on success the temporary file replaces `path`; on any exception (including
    KeyboardInterrupt) it is deleted and `path` is left as it was. `n_frames` may be set after opening,
    before the first frame (a stream learns it from the audio).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        audio_path: str | os.PathLike,
        n_frames: int | None = None,
        *,
        crf: int = 18,
        preset: str = "medium",
        threads: int = 0,
        colour: ColourTags = BT601,
    ):
        check_encoder_options(crf, preset, threads)
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise InputError(f"{self.path.parent}: output folder does not exist")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder, not an output file name")
        self.tmp_path: Path | None = None  # created on entering
        self._lock: int | None = None
        self.audio_path, self.n_frames = audio_path, n_frames
        self.crf, self.preset, self.threads = crf, preset, threads
        self.colour = colour  # the tags; frames are encoded with BT.601 whatever they say (media.colour_tags)
        self.frames_written = 0
        self._container = self._video = self._audio = self._audio_stream = None
        self._audio_written = 0
        self._audio_ended = False

    def __enter__(self) -> SyncedVideoWriter:
        folder = self.path.parent
        try:
            remove_stale_partials(folder)
            self.tmp_path, self._lock = claim_partial(self.path)
        except OSError as e:
            error = OutputError if e.errno in DISK_ERRORS and e.errno != errno.EROFS else InputError
            raise error(f"{folder}: cannot write the output there ({e.strerror})") from None
        try:
            self._container = av.open(str(self.tmp_path), "w", options=self._muxer_options())
        except (av.FFmpegError, ValueError) as e:
            self._abort()
            raise InputError(f"{self.path}: cannot write this output ({e})") from None
        try:
            self._audio = _AudioSource(self.audio_path)
            self._audio_stream = self._container.add_stream("aac", rate=self._audio.rate, layout=self._audio.layout)
        except BaseException:
            self._abort()
            raise
        return self

    def _muxer_options(self) -> dict:
        return {"movflags": "+faststart"} if self.path.suffix.lower() in (".mp4", ".mov", ".m4v") else {}

    def _open_video(self, height: int, width: int) -> None:
        stream = self._container.add_stream("libx264", rate=FPS, options={"crf": str(self.crf), "preset": self.preset})
        stream.width, stream.height = width - width % 2, height - height % 2  # yuv420p needs even sizes
        stream.pix_fmt = "yuv420p"
        # Frames are RGB as upstream decodes them (BT.601 whatever the file says) and go back to YUV through the
        # same matrix, so the output's YUV is the source's; tagged as the source is (media.colour_tags), it shows
        # as the source does (upstream's own output is untagged: players that take untagged HD for BT.709 show a
        # BT.601 source shifted in colour)
        cc, tags = stream.codec_context, self.colour
        cc.colorspace, cc.color_primaries, cc.color_trc = tags.matrix, tags.primaries, tags.transfer
        cc.color_range = LIMITED_RANGE
        # 0 (PyAV's default): x264 sizes its threads to the cores; 1 thread took 70 ms per 1080x1920 frame at
        # `medium` (RESULTS.md), slower than real time, but suits many clients sharing a machine
        stream.codec_context.thread_count = self.threads
        self._video = stream

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 frame (H, W, 3); an odd size loses its last row / column."""
        if self.n_frames is None:
            raise RuntimeError("set n_frames before writing frames")
        if self._video is None:
            self._open_video(*frame.shape[:2])
        h, w = self._video.height, self._video.width
        if frame.shape[:2] != (h, w):
            frame = np.ascontiguousarray(frame[:h, :w])
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
            format="yuv420p",
            dst_colorspace=DECODE_MATRIX,  # back through the matrix the frames were decoded with
            dst_color_range="MPEG",  # what the stream's range tag says
        )
        video_frame.pts = self.frames_written
        self._container.mux(self._video.encode(video_frame))
        self.frames_written += 1
        self._write_audio_until(self.frames_written / FPS)

    def _write_audio_until(self, seconds: float | None) -> None:
        """Keep the audio abreast of the video so the muxer interleaves without buffering (None: to the end)."""
        trimmed = int(self.n_frames * self._audio.rate / FPS)  # upstream: int(N / 25 * sr)
        target = trimmed if seconds is None else min(trimmed, int(seconds * self._audio.rate))
        while self._audio_written < target and not self._audio_ended:
            chunk = self._audio.read(min(4096, target - self._audio_written))
            if chunk is None:
                self._audio_ended = True  # the track is shorter than the video
                break
            chunk.pts = self._audio_written
            self._audio_written += chunk.samples
            self._container.mux(self._audio_stream.encode(chunk))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if not self.frames_written or self.frames_written != self.n_frames:
                raise RuntimeError(f"wrote {self.frames_written} of {self.n_frames} frames")
            self._write_audio_until(None)
            self._container.mux(self._video.encode())
            self._container.mux(self._audio_stream.encode())
            self._container.close()
            self._audio.close()
            os.replace(self.tmp_path, self.path)
            self._unlock()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """Close everything without caring how, and delete the temporary file."""
        for closable in (self._container, self._audio):
            try:
                if closable is not None:
                    closable.close()
            except Exception:
                pass
        if self.tmp_path is not None:
            self.tmp_path.unlink(missing_ok=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
