"""The stand-ins of `latentsync-export --stand-ins` keep their models' interfaces (the serving path's ceiling
benchmark and test_memory run the real lipsync numerics on what they return)."""

import torch

from latentsync_core.vae import sample_latents
from latentsync_serving.stand_ins import NullCodec


def test_null_codec_answers_uint8_faces_as_the_served_encoder_does():
    faces = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8)
    keep = torch.full((3, 1, 256, 256), 255, dtype=torch.uint8)
    post = NullCodec().encode_faces(faces, keep)
    assert post.mean.shape == post.std.shape == (3, 4, 32, 32)
    assert post.mean.dtype == post.std.dtype == torch.float32  # the stream draws its noise in this dtype
    assert not post.mean.any() and not post.std.any()
    assert sample_latents(post, torch.Generator().manual_seed(0)).shape == (3, 4, 32, 32)
