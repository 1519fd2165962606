"""Whisper encoder loading and upstream's audio feature path (log-mel, segment encoding, per-frame chunks)."""

import json
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentsync_contract import num_frames_for_audio
from latentsync_core import audio
from latentsync_core.checkpoints import CheckpointError
from latentsync_core.loaders import load_whisper_encoder
from latentsync_core.models.whisper import whisper_state_dict_shapes

# Real encoder context (the encoder always sees 3000 mel frames), everything else tiny, for fast synthetic tests.
SMALL_DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 16,
    "n_audio_head": 2,
    "n_audio_layer": 2,
    "n_vocab": 11,
    "n_text_ctx": 4,
    "n_text_state": 8,
    "n_text_head": 2,
    "n_text_layer": 1,
}


def random_checkpoint(dims: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = whisper_state_dict_shapes(dims)
    sd = {k: (torch.randn(s, generator=g) / max(1, s[-1]) ** 0.5).half() for k, s in shapes.items()}
    return {"dims": dict(dims), "model_state_dict": sd}


@pytest.fixture(scope="module")
def small_encoder():
    return load_whisper_encoder(random_checkpoint(SMALL_DIMS))


# --- golden parity ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(shared_dir, tmp_path_factory):
    case_dir = shared_dir / "golden" / "audio_features"
    case = json.loads((case_dir / "case.json").read_text())
    dims = json.loads((case_dir / case["weights"]["dims_file"]).read_text())
    weights = load_file(str(case_dir / case["weights"]["file"]))
    ckpt = tmp_path_factory.mktemp("whisper") / "tiny.pt"
    torch.save({"dims": dims, "model_state_dict": weights}, ckpt)  # OpenAI's format, through the real loader
    encoder = load_whisper_encoder(ckpt)
    samples = np.load(case_dir / case["inputs"]["file"])["audio_16k_f32"]
    mel = audio.log_mel_spectrogram(samples)
    features = audio.encode_features(encoder, mel)
    return dict(
        case=case,
        dir=case_dir,
        weights=weights,
        encoder=encoder,
        samples=samples,
        mel=mel,
        features=features,
        chunks=audio.feature_chunks(features),
        out=np.load(case_dir / case["outputs"]["file"]),
    )


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def test_log_mel_matches_golden(golden):
    assert max_abs(golden["mel"], golden["out"]["log_mel"]) <= golden["case"]["tolerance"]["log_mel_max_abs"]


def test_whisper_features_match_golden(golden):
    tol = golden["case"]["tolerance"]["whisper_features_max_abs"]
    assert max_abs(golden["features"], golden["out"]["whisper_features"]) <= tol


def test_chunks_match_golden(golden):
    tol, out, chunks = golden["case"]["tolerance"]["chunks_max_abs"], golden["out"], golden["chunks"]
    assert len(chunks) == golden["case"]["outputs"]["n_chunks"]
    names = [n for n in out.files if n.startswith(("chunks_first", "chunks_last"))]
    assert names, "golden outputs hold no chunks to compare"
    for name in names:
        k = len(out[name])
        ours = chunks[:k] if name.startswith("chunks_first") else chunks[-k:]
        assert max_abs(ours, out[name]) <= tol, name


def test_chunk_indices_and_frame_count_match_golden(golden):
    indices = audio.feature_chunk_indices(len(golden["features"]))
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, golden["out"]["chunk_feature_indices"])
    assert num_frames_for_audio(len(golden["samples"])) == golden["case"]["outputs"]["n_chunks"]


def test_positional_embedding_comes_from_the_checkpoint(golden):
    stored = golden["weights"]["encoder.positional_embedding"]
    assert golden["encoder"].positional_embedding.dtype == torch.float32
    assert torch.equal(golden["encoder"].positional_embedding, stored.float())


def test_load_audio_equals_golden_samples(golden):
    samples = audio.load_audio(golden["dir"] / "input.wav")
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, golden["samples"])


# --- checkpoint structure and strict loading ------------------------------------------------------------------------


def test_state_dict_shapes_equal_real_whisper_manifests(shared_dir):
    case_dir = shared_dir / "golden" / "whisper_manifest"
    files = json.loads((case_dir / "case.json").read_text())["files"]
    assert files
    for name, file in files.items():
        manifest = json.loads((case_dir / file).read_text())
        ours = whisper_state_dict_shapes(manifest["dims"])
        assert list(ours) == list(manifest["state_dict"]), name  # same keys, same order
        assert ours == {k: tuple(v) for k, v in manifest["state_dict"].items()}, name


def test_missing_decoder_key_is_rejected():
    ckpt = random_checkpoint(SMALL_DIMS)
    del ckpt["model_state_dict"]["decoder.ln.bias"]  # decoder keys are checked too, like upstream's strict load
    with pytest.raises(CheckpointError, match=r"missing key 'decoder\.ln\.bias'"):
        load_whisper_encoder(ckpt)


def test_wrong_shape_is_rejected():
    ckpt = random_checkpoint(SMALL_DIMS)
    ckpt["model_state_dict"]["encoder.blocks.1.mlp.0.weight"] = torch.zeros(3, 3, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=r"'encoder\.blocks\.1\.mlp\.0\.weight' has shape \(3, 3\)"):
        load_whisper_encoder(ckpt)


def test_unexpected_key_and_bad_format_are_rejected(tmp_path):
    ckpt = random_checkpoint(SMALL_DIMS)
    ckpt["model_state_dict"]["encoder.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected key 'encoder\.extra'"):
        load_whisper_encoder(ckpt)
    bare = tmp_path / "bare.pt"
    torch.save(random_checkpoint(SMALL_DIMS)["model_state_dict"], bare)  # a state dict without "dims"
    with pytest.raises(CheckpointError, match="dims"):
        load_whisper_encoder(bare)
    with pytest.raises(CheckpointError):
        load_whisper_encoder(tmp_path / "absent.pt")


def test_checkpoint_for_other_dims_is_rejected():
    ckpt = random_checkpoint(SMALL_DIMS)
    ckpt["dims"] = {**SMALL_DIMS, "n_audio_layer": SMALL_DIMS["n_audio_layer"] + 1}
    with pytest.raises(CheckpointError, match=r"missing key 'encoder\.blocks\.2\."):
        load_whisper_encoder(ckpt)


# --- segments, chunking and frame count on synthetic audio ----------------------------------------------------------


def upstream_chunk_indices(n_features: int, fps: float) -> np.ndarray:
    """A literal transcription of upstream's feature2chunks / get_sliced_feature loop (test oracle)."""
    rows, i = [], 0
    while True:
        centre = int(i * 50 / fps)
        rows.append([min(max(0, j), n_features - 1) for j in range(centre - 4, centre + 6)])
        stop = int(i * (50.0 / fps)) > n_features
        i += 1
        if stop:
            return np.array(rows)


@pytest.mark.parametrize("fps", [25, 30, 24])
def test_chunk_indices_follow_upstream_loop(fps):
    for n_features in [1, 2, 3, 7, 150, 151, 1499, 1500, 1501, 4000]:
        np.testing.assert_array_equal(
            audio.feature_chunk_indices(n_features, fps), upstream_chunk_indices(n_features, fps)
        )


def test_feature_chunks_gather_steps_then_layers(small_encoder):
    feats = torch.randn(9, SMALL_DIMS["n_audio_layer"] + 1, SMALL_DIMS["n_audio_state"])
    chunks = audio.feature_chunks(feats)
    idx = audio.feature_chunk_indices(len(feats))
    assert chunks.shape == (len(idx), 10 * feats.shape[1], feats.shape[2])
    for i in (0, len(idx) // 2, len(idx) - 1):
        assert torch.equal(chunks[i], torch.cat([feats[j] for j in idx[i]]))


def test_long_audio_is_encoded_in_zero_padded_segments(small_encoder):
    rng = np.random.default_rng(0)
    n_samples = 16000 * 31 + 16000 // 2 + 170  # > 30 s: two segments, an odd-length second one
    samples = (0.1 * rng.standard_normal(n_samples)).astype(np.float32)
    mel = audio.log_mel_spectrogram(samples)
    assert mel.shape == (SMALL_DIMS["n_mels"], n_samples // 160)
    feats = audio.encode_features(small_encoder, mel)
    assert feats.shape == (mel.shape[1] // 2, SMALL_DIMS["n_audio_layer"] + 1, SMALL_DIMS["n_audio_state"])
    # Each 30 s segment is encoded on its own, the second zero-padded in log-mel space; the 50 Hz rows are kept.
    seg = audio.SEGMENT_FRAMES
    rest = mel[:, seg:]
    with torch.no_grad():
        first = small_encoder(mel[None, :, :seg])[0]
        second = small_encoder(torch.nn.functional.pad(rest, (0, seg - rest.shape[1]))[None])[0]
    torch.testing.assert_close(feats[: seg // 2], first[: seg // 2], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats[seg // 2 :], second[: rest.shape[1] // 2], rtol=0, atol=1e-5)
    # Frame count: the chunk list of the real features has the length num_frames_for_audio predicts.
    chunks = audio.feature_chunks(feats)
    assert len(chunks) == num_frames_for_audio(n_samples) == len(upstream_chunk_indices(len(feats), 25))


@pytest.mark.parametrize("n_samples", [320, 16000 + 1, 48000 + 480])
def test_num_frames_for_audio_counts_the_chunks(small_encoder, n_samples):
    samples = np.sin(np.arange(n_samples) * 0.05).astype(np.float32)
    chunks = audio.AudioFeaturizer(small_encoder)(samples)
    assert chunks.shape[1:] == (10 * (SMALL_DIMS["n_audio_layer"] + 1), SMALL_DIMS["n_audio_state"])
    assert len(chunks) == num_frames_for_audio(n_samples)


def test_too_short_audio_is_rejected():
    with pytest.raises(ValueError):
        audio.log_mel_spectrogram(np.zeros(100, np.float32))


def test_load_audio_downmixes_and_resamples(tmp_path):
    rate, seconds = 44100, 1.0
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)
    pcm = np.round(np.stack([tone, tone], 1) * 32767).astype(np.int16)
    path = tmp_path / "stereo44k.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    samples = audio.load_audio(path)
    assert samples.dtype == np.float32 and abs(len(samples) - 16000 * seconds) <= 1
    np.testing.assert_array_equal(samples * 32768, np.round(samples * 32768))  # the s16 grid, / 32768
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(samples)) / 16000)
    assert np.abs(samples - expected)[100:-100].max() < 1e-3  # away from the resampler's edge transients
