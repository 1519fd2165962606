"""Which source frames a 25 fps video is made of, as upstream's `ffmpeg -r 25` re-encode chooses them.

Upstream (`read_video(..., change_fps=True)`) re-encodes every input with `ffmpeg -i video -r 25 -crf 18 out.mp4`
and reads that. For an mp4 output FFmpeg's command line syncs video at a constant frame rate: each decoded frame
is written 0, 1 or more times, by its timestamp against the next output slot (fftools `do_video_out` /
`video_sync_process`, VSYNC_CFR; VSYNC_VSCFR when the input file has a single stream). Its thresholds (1.1 and
-1.1 slots, `lrintf` rounding, a frame's duration rounded to whole slots) are what this module reproduces, so a
22 fps or variable-rate video gives upstream's frames, not the frames on screen at k/25 (which differ by one slot
on most of a variable-rate clip). Checked frame for frame against Debian 12's FFmpeg 5.1 (the one upstream's
reference data was made with) on real and synthetic clips (tests/test_client_media.py).

One known difference: the last frame's duration is the one this PyAV's FFmpeg demuxer reports; FFmpeg 5.1's mp4
demuxer reports none for some files' last sample, so its output can be one frame shorter there.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

EXTRA_BITS = 16  # FFmpeg's sub-slot precision for the frame time at a 1/25 s encoder time base: 29 - log2(25)
NUDGE = 2.0**-17  # FFmpeg moves frame times off exact midpoints by this much


def lrintf(x: float) -> int:
    """C's lrintf: to single precision, then to the nearest integer, ties to even."""
    return int(np.rint(np.float32(x)))


def rescale(value: Fraction) -> int:
    """av_rescale_q's rounding (AV_ROUND_NEAR_INF): nearest integer, ties away from zero."""
    return int(math.copysign(math.floor(abs(value) + Fraction(1, 2)), value))


def start_offset(start_time_us: int | None, time_base: Fraction) -> int:
    """What FFmpeg adds to a stream's timestamps so that the file starts at 0: -(the file's start) in stream units."""
    return rescale(Fraction(-(start_time_us or 0), 1_000_000) / time_base)


class ConstantRateSync:
    """FFmpeg's constant-frame-rate video sync at `fps`: `push` each decoded frame's time and duration (seconds, from
    the file's start); it says how many output frames repeat the previous frame, then the current one."""

    def __init__(self, fps: int, single_stream: bool = False, frame_rate: Fraction | None = None):
        self.fps = fps
        self.single_stream = single_stream  # VSYNC_VSCFR: initial gaps are not filled
        # a frame without a usable duration lasts one source frame, at most one output slot
        self.default_duration = min(fps / float(frame_rate), 1.0) if frame_rate else 0.0
        self.next_slot = 0
        self.recent_repeats = [0, 0, 0]  # repeats of the previous frame, newest first (the end's flush uses them)

    def push(self, time: Fraction, duration: Fraction | None) -> tuple[int, int]:
        """(n_previous, n): the output gets n frames, the first n_previous of them the previous frame."""
        slots = rescale(time * self.fps * 2**EXTRA_BITS) / 2**EXTRA_BITS
        slots += math.copysign(NUDGE, slots) if slots else 0.0
        whole = lrintf(float(duration * self.fps)) if duration else 0
        length = float(whole) if whole > 0 else self.default_duration
        delta0 = slots - self.next_slot  # how far the frame is from the next output slot
        delta = delta0 + length
        n, n_previous = 1, 0
        if delta0 < 0 < delta:  # a frame that starts in the past is clipped to the present
            length += delta0
            delta0 = 0.0
        if self.single_stream and self.next_slot == 0 and delta0 >= 0.5:  # VSCFR: no copies before the first
            delta, delta0 = length, 0.0
            self.next_slot = int(np.rint(slots))
        if delta < -1.1:
            n = 0
        elif delta > 1.1:
            n = lrintf(delta)
            if delta0 > 1.1:
                n_previous = lrintf(delta0 - 0.6)
        n_previous = min(n_previous, n)
        self.recent_repeats = [n_previous, *self.recent_repeats[:2]]
        self.next_slot += n
        return n_previous, n

    def flush(self) -> int:
        """How many more times the last frame is written at the end of the input."""
        n = sorted(self.recent_repeats)[1]
        self.next_slot += n
        return n
