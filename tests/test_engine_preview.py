"""Latent previews: a linear map from latent channels to RGB, cheap enough to run every step."""

from __future__ import annotations

import torch

from vramwise.preview import latent_preview


def test_preview_maps_channels_to_rgb_and_upscales_the_middle_frame():
    latents = torch.zeros(1, 2, 3, 4, 6)
    latents[0, 0, 1] = 1.0  # channel 0 lit only in the middle frame
    factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    image = latent_preview(latents, factors, bias=[0.0, 0.0, -1.0], max_size=60)
    assert image.size == (60, 40)
    assert image.getpixel((10, 10)) == (255, 128, 0)


def test_preview_is_skipped_when_the_factors_do_not_fit():
    assert latent_preview(torch.zeros(1, 16, 2, 4, 4), [[1.0, 0.0, 0.0]] * 48) is None
