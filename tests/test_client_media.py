"""latentsync_client media side (no server): 25 fps resampling, rotation, photos, ping-pong looping, 16 kHz
audio, the frame-count formula against upstream's golden data, and clear errors for unusable files."""

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import ffmpeg_r25_cases
import numpy as np
import pytest
from helpers import frame_codes, write_clip, write_wav

from latentsync_client import InputError, audio_chunks, frames_25fps, frames_for_audio, media, num_frames_for_audio
from latentsync_client.writer import SyncedVideoWriter
from latentsync_contract import MAX_FRAME_SIDE, MIN_FRAME_SIDE


def test_client_imports_neither_torch_nor_the_server_core():
    code = (
        "import sys, latentsync_client, latentsync_client.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'latentsync_core')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------ clip makers
def remux_rotated(src, dst, degrees):
    """Copy `src`'s video packets unchanged into `dst` with a display-matrix rotation."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        s_out.set_display_rotation(degrees)
        for packet in inp.demux(s_in):
            if packet.dts is not None:
                packet.stream = s_out
                out.mux(packet)
    return Path(dst)


# ------------------------------------------------------------------------------------------------ 25 fps
FFMPEG_R25 = json.loads(ffmpeg_r25_cases.RECORDED.read_text())["frames"]
# Two clips whose last frame only FFmpeg 5.1 drops: its mp4 demuxer gives their last sample no duration, where PyAV's
# newer FFmpeg reads one frame's (the file's stts). The sync itself is the same: every other frame agrees.
LAST_FRAME_KEPT = {"30fps, video 70 ms after the audio", "variable rate, video 33 ms after the audio"}


@pytest.mark.parametrize("case", list(ffmpeg_r25_cases.CASES))
def test_frames_are_those_that_ffmpeg_r25_writes(tmp_path, case):
    """Upstream re-encodes with `ffmpeg -r 25`: the same source frames, duplicated and dropped where it does."""
    got = frame_codes(frames_25fps(ffmpeg_r25_cases.write_case(case, tmp_path)))
    expected = FFMPEG_R25[case]
    assert got == (expected + [35] if case in LAST_FRAME_KEPT else expected)


def test_real_variable_rate_clip_gives_ffmpegs_frames(shared_dir):
    """A phone-style clip (22 fps on average, frames 1/30 and 1/15 s apart, video 33 ms after the audio): the frames
    on screen at k/25 would be one frame early on 110 of its 154 frames; FFmpeg's sync is followed exactly."""
    clip = shared_dir / "media" / ffmpeg_r25_cases.REAL_CLIP
    with av.open(str(clip)) as c:
        sources = {frame.to_ndarray(format="rgb24").tobytes(): i for i, frame in enumerate(c.decode(video=0))}
        stream = c.streams.video[0]
        assert abs(float(stream.average_rate) - 25) > 1  # the clip is not 25 fps to begin with
    frames = list(frames_25fps(clip))
    assert [sources[f.tobytes()] for f in frames] == FFMPEG_R25[ffmpeg_r25_cases.REAL_CLIP]


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_display_matrix_rotation_is_applied(shared_dir, tmp_path, degrees):
    src = shared_dir / "media" / "retalking_face2.mp4"
    rotated = remux_rotated(src, tmp_path / "rotated.mp4", degrees)
    upright, turned = list(frames_25fps(src)), list(frames_25fps(rotated))
    assert len(turned) == len(upright)
    for a, b in zip(upright[::10], turned[::10]):  # same packets: pixels identical once turned back
        np.testing.assert_array_equal(b, np.rot90(a, degrees // 90))


def test_rotated_non_square_clip_is_upright(tmp_path):
    clip = write_clip(tmp_path / "portrait.mp4", 3, size=(32, 64), rotation=-90)  # phone-style "rotate=90"
    frames = list(frames_25fps(clip))
    assert frames[0].shape == (64, 32, 3)


def test_still_photo_with_exif_orientation_becomes_a_video(tmp_path):
    from PIL import Image as PIL

    h, w = 40, 64
    photo = np.zeros((h, w, 3), np.uint8)
    photo[:, : w // 2] = (200, 30, 30)  # left half red, right half black
    image = PIL.fromarray(photo)
    exif = image.getexif()
    exif[0x0112] = 6  # EXIF orientation 6: turn 90 deg clockwise to show
    image.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    frames = list(frames_for_audio(tmp_path / "photo.jpg", 9))
    assert len(frames) == 9
    expected = np.rot90(photo, -1).astype(np.int16)
    for f in frames:
        assert f.shape == (w, h, 3)
        assert np.abs(f.astype(np.int16) - expected).mean() < 4


# ------------------------------------------------------------------------------------------------ length
def upstream_loop(n_src, n_out):
    """Source indices upstream's loop_video produces: forward, reversed, forward, ... cut to n_out."""
    forward = list(range(n_src))
    if n_out <= n_src:
        return forward[:n_out]
    loops = [forward if i % 2 == 0 else forward[::-1] for i in range(math.ceil(n_out / n_src))]
    return [i for loop in loops for i in loop][:n_out]


@pytest.mark.parametrize("n_out", [4, 10, 11, 23, 47])
def test_video_is_cut_or_looped_ping_pong(tmp_path, n_out):
    n_src = 10
    clip = write_clip(tmp_path / "clip.mp4", n_src)
    assert frame_codes(frames_for_audio(clip, n_out)) == upstream_loop(n_src, n_out)


def test_loop_survives_a_container_that_overstates_its_duration(tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "clip.mp4", 6)
    monkeypatch.setattr(media, "declared_duration", lambda path: 3600.0)  # "long enough: no spill needed"
    assert frame_codes(frames_for_audio(clip, 20)) == upstream_loop(6, 20)


def test_looped_frames_are_replayed_from_disk(tmp_path):
    """The replay buffer is a file in the spill folder, not RAM; it is gone once the frames are consumed."""
    clip = write_clip(tmp_path / "clip.mp4", 5)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    frames = frames_for_audio(clip, 12, spill_dir)
    for _ in range(5):
        next(frames)
    spill = media.FrameSpill(spill_dir)  # the same mechanism, inspected directly
    spill.append(np.zeros((4, 4, 3), np.uint8))
    assert spill._file.tell() == 4 * 4 * 3
    spill.close()
    assert frame_codes(frames) == upstream_loop(5, 12)[5:]
    assert list(spill_dir.iterdir()) == []  # unlinked temporary files leave nothing behind


# ------------------------------------------------------------------------------------------------ audio
def test_audio_matches_upstream_load_audio(shared_dir):
    case = shared_dir / "golden" / "audio_features"
    expected = np.load(case / "inputs.npz")["audio_16k_f32"]
    got = np.concatenate(list(audio_chunks(case / "input.wav", chunk_samples=len(expected) // 3 + 1)))
    np.testing.assert_array_equal(got, expected)


def test_frame_count_formula_matches_upstream_chunks(shared_dir):
    case = shared_dir / "golden" / "audio_features"
    meta = json.loads((case / "case.json").read_text())
    n_samples = meta["inputs"]["arrays"]["audio_16k_f32"]["shape"][0]
    assert num_frames_for_audio(n_samples) == meta["outputs"]["n_chunks"]


def test_any_rate_and_layout_becomes_16k_mono(tmp_path):
    rate, seconds, tone = 44100, 1.5, 440.0
    t = np.arange(int(rate * seconds)) / rate
    stereo = np.stack([0.5 * np.sin(2 * np.pi * tone * t), 0.5 * np.sin(2 * np.pi * tone * t)])
    wav = write_wav(tmp_path / "stereo44k.wav", stereo, rate)
    chunks = list(audio_chunks(wav, chunk_samples=4000))
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    assert all(len(c) == 4000 for c in chunks[:-1])
    samples = np.concatenate(chunks)
    assert abs(len(samples) - seconds * 16000) <= 32
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16000 / len(samples) - tone) < 2
    assert 0.4 < np.abs(samples).max() <= 0.51


def test_audio_track_of_a_video_file(shared_dir):
    clip = shared_dir / "media" / "retalking_face2.mp4"
    with av.open(str(clip)) as c:
        seconds = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    n = sum(len(c) for c in audio_chunks(clip))
    assert abs(n / 16000 - seconds) < 0.05


# ------------------------------------------------------------------------------------------------ errors
def test_unusable_files_raise_input_error_naming_the_file(tmp_path, shared_dir):
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 100)
    with pytest.raises(InputError, match="notes.txt"):
        next(frames_25fps(text))
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    with pytest.raises(InputError, match="noise.mp4: unsupported"):
        next(audio_chunks(noise))
    with pytest.raises(InputError, match="no such file"):
        next(audio_chunks(tmp_path / "missing.wav"))
    with pytest.raises(InputError, match="no video stream"):
        next(frames_25fps(shared_dir / "media" / "demo1_audio.wav"))
    silent = write_clip(tmp_path / "silent.mp4", 3)
    with pytest.raises(InputError, match="no audio track"):
        next(audio_chunks(silent))
    with pytest.raises(InputError, match="no audio track"):
        media.check_inputs(silent, silent)


def test_frames_over_the_servers_size_limit_are_refused_before_connecting(tmp_path, shared_dir):
    from PIL import Image

    Image.fromarray(np.zeros((16, MAX_FRAME_SIDE + 4, 3), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(
        InputError, match=f"wide.png: the server would refuse it: FRAMES are {MAX_FRAME_SIDE + 4}x16 pixels; at most"
    ):
        media.check_inputs(tmp_path / "wide.png", shared_dir / "media" / "demo1_audio.wav")
    Image.fromarray(np.zeros((16, MAX_FRAME_SIDE, 3), np.uint8)).save(tmp_path / "ok.png")
    media.check_inputs(tmp_path / "ok.png", shared_dir / "media" / "demo1_audio.wav")


def test_frames_under_the_clients_size_limit_are_refused_before_connecting(tmp_path, shared_dir):
    """The h264 output crops to even sizes: a side of 1 pixel would leave nothing."""
    from PIL import Image

    Image.fromarray(np.zeros((MIN_FRAME_SIDE - 1, 9, 3), np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(
        InputError, match="flat.png: the server would refuse it: FRAMES are 9x1 pixels; at least 2 per side"
    ):
        media.check_inputs(tmp_path / "flat.png", shared_dir / "media" / "demo1_audio.wav")
    Image.fromarray(np.zeros((MIN_FRAME_SIDE, MIN_FRAME_SIDE, 3), np.uint8)).save(tmp_path / "ok.png")
    media.check_inputs(tmp_path / "ok.png", shared_dir / "media" / "demo1_audio.wav")


# ------------------------------------------------------------------------------------------------ writer
def test_writer_leaves_nothing_behind_on_failure(tmp_path, shared_dir):
    out = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        with SyncedVideoWriter(out, shared_dir / "media" / "demo1_audio.wav", 10) as writer:
            writer.write(np.zeros((32, 32, 3), np.uint8))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_the_output_has_its_sources_yuv_and_colour_tags(tmp_path, shared_dir):
    """Frames go to RGB as upstream's OpenCV takes them (BT.601 whatever the tag) and back through BT.601, so the
    output's YUV is the source's; tagged as the source is (BT.709 here), it shows as the source does. (It was
    decoded through its tag and encoded BT.709: the same display, but the model saw other RGB than upstream's.)"""
    source = shared_dir / "media" / "demo1_video.mp4"  # BT.709-tagged HD
    frames = list(itertools.islice(media.frames_25fps(source), 2))
    out = tmp_path / "out.mp4"
    colour = media.colour_tags(source)
    assert colour == media.ColourTags(matrix=1, primaries=1, transfer=1)
    with SyncedVideoWriter(out, shared_dir / "media" / "demo1_audio.wav", len(frames), crf=0, colour=colour) as w:
        for frame in frames:
            w.write(frame)

    def yuv(path):
        with av.open(str(path)) as c:
            context, frame = c.streams.video[0].codec_context, next(c.decode(video=0))
            tags = (context.colorspace, context.color_primaries, context.color_trc, context.color_range)
            return tags, frame.to_ndarray(format="yuv420p").astype(int), frame.height

    (tags, got, height), (source_tags, expected, _) = yuv(out), yuv(source)
    assert tags == source_tags == (1, 1, 1, 1)
    # swscale's YUV -> RGB -> YUV rounding (as much as with BT.709 both ways: Y mean 1.03); chroma is kept
    luma, chroma = np.abs(got - expected)[:height], np.abs(got - expected)[height:]
    assert luma.mean() < 1.1 and np.percentile(luma, 99) <= 2 and chroma.mean() < 0.1, (luma.mean(), chroma.mean())


@pytest.mark.parametrize("clip", ["demo1_video.mp4", "retalking_face2.mp4", "small untagged"])
def test_frames_are_the_rgb_upstreams_opencv_reads(tmp_path, shared_dir, clip):
    """BT.709-tagged HD, untagged 844x844 and untagged 640x360 video: each frame is, value for value, what
    cv2.VideoCapture (upstream's read_video_cv2, BGR -> RGB) gives. Untagged sources keep no tag in the output."""
    import cv2

    if clip == "small untagged":
        frame = av.VideoFrame(640, 360, "yuv420p")
        for plane, value in zip(frame.planes, (120, 90, 170)):  # a saturated colour: the matrices differ most
            plane.update(np.full(plane.buffer_size, value, np.uint8))
        path = tmp_path / "untagged.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=25, options={"crf": "0"})
            stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
            frame.pts = 0
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    else:
        path = shared_dir / "media" / clip
    capture = cv2.VideoCapture(str(path))
    ok, bgr = capture.read()
    capture.release()
    assert ok
    first = next(media.frames_25fps(path))
    np.testing.assert_array_equal(first, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if clip != "demo1_video.mp4":
        assert media.colour_tags(path).matrix == media.UNSPECIFIED


def test_photos_are_tagged_as_the_matrix_they_are_encoded_with(tmp_path):
    """An RGB picture (PNG) or a JPEG (BT.601 full range by definition) gives a BT.601-tagged output: the matrix
    the writer uses, so players show the picture's colours."""
    from PIL import Image as PIL

    picture = np.zeros((8, 8, 3), np.uint8)
    for name in ("photo.png", "photo.jpg"):
        PIL.fromarray(picture).save(tmp_path / name)
        assert media.colour_tags(tmp_path / name).matrix in (5, 6)  # BT470BG and SMPTE170M: the same matrix
    assert media.colour_tags(tmp_path / "photo.png") == media.BT601


def test_writer_output_timing_and_trimmed_audio(tmp_path, shared_dir):
    out, n = tmp_path / "out.mp4", 30
    with SyncedVideoWriter(out, shared_dir / "media" / "retalking_face2.mp4", n, preset="ultrafast") as writer:
        for i in range(n):
            writer.write(np.full((33, 47, 3), i * 8, np.uint8))  # odd sizes are cut to even
    with av.open(str(out)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        assert (video.average_rate, video.width, video.height) == (25, 46, 32)
        frames = list(c.decode(video))
        assert [f.pts * f.time_base for f in frames] == [Fraction(i, 25) for i in range(n)]
        # the audio track is trimmed to the video (AAC's end padding is hidden by the mp4 edit list)
        assert abs(float(audio.duration * audio.time_base) - n / 25) < 1e-3
        assert audio.codec_context.name == "aac"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_writer_checks_encoder_options_first_and_passes_threads(tmp_path, shared_dir):
    audio = shared_dir / "media" / "retalking_face2.mp4"
    refused = (
        {"preset": "fastest"},
        {"preset": ""},
        {"crf": 52},
        {"crf": -1},
        {"crf": "18"},
        {"crf": True},
        {"threads": -1},
        {"threads": 129},
        {"threads": 2.5},
        {"threads": None},
    )
    for options in refused:
        with pytest.raises(InputError):
            SyncedVideoWriter(tmp_path / "out.mp4", audio, 2, **options)
    assert list(tmp_path.iterdir()) == []  # refused before any file was made
    for options in ({"preset": "Medium"}, {"preset": "0"}, {"crf": 18.5}, {"threads": np.int64(2)}):  # as x264 reads
        with SyncedVideoWriter(tmp_path / "ok.mp4", audio, 1, **options) as writer:
            writer.write(np.zeros((16, 16, 3), np.uint8))
        (tmp_path / "ok.mp4").unlink()
    for threads in (1, 0):  # 0: x264 picks from the cores
        with SyncedVideoWriter(tmp_path / "out.mp4", audio, 2, preset="ultrafast", threads=threads) as writer:
            for _ in range(2):
                writer.write(np.zeros((32, 32, 3), np.uint8))
            assert writer._video.codec_context.thread_count == threads
        assert (tmp_path / "out.mp4").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ decode-ahead
def test_prefetch_keeps_order_bounds_lookahead_and_reraises():
    from latentsync_client.sync import prefetch

    pulled = []

    def source():
        for i in range(50):
            pulled.append(i)
            yield i
        raise InputError("broken at 50")

    seen = []
    with pytest.raises(InputError, match="broken at 50"):
        for item in prefetch(source(), depth=4):
            seen.append(item)
            assert len(pulled) - len(seen) <= 4 + 2  # queue depth + one in hand on each side
    assert seen == list(range(50))

    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    it = prefetch(endless(), depth=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    it.close()  # stops and closes the source
    assert closed == [True]
