"""Qwen-Image-Edit conditioning: every sample of a batch is embedded with its own control image(s),
and the VAE latents are normalised by the VAE's latents_mean / latents_std."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.models.qwen_image_edit.conditioning import PLUS_TEMPLATE, encode_prompt, templated, vae_decode, vae_encode
from qflux.models.qwen_image_edit.loaders import load_qwen_image_edit
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    path: Path = build_qwen_image_edit(tmp_path_factory.mktemp("tiny-qwen"), seed=0)
    return load_qwen_image_edit(path, torch.float32)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


def test_same_prompt_different_images_give_different_conditioning(models) -> None:
    a, b = _image(1), _image(2)
    both, mask = encode_prompt(models.text_encoder, models.processor, ["make it red", "make it red"], [a, b])
    assert not torch.allclose(both[0], both[1])  # the second sample saw its own image, not the first's
    alone, _ = encode_prompt(models.text_encoder, models.processor, ["make it red"], [b])
    torch.testing.assert_close(both[1][: alone.shape[1]], alone[0])
    assert mask.shape == both.shape[:2] and bool(mask.all())


def test_edit_plus_template_numbers_each_picture(models) -> None:
    text = templated("swap them", 2, "edit_plus")
    assert text == PLUS_TEMPLATE.format(
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
        "swap them"
    )
    one, _ = encode_prompt(models.text_encoder, models.processor, ["x"], [[_image(1)]], variant="edit_plus")
    two, _ = encode_prompt(models.text_encoder, models.processor, ["x"], [[_image(1), _image(2)]], variant="edit_plus")
    none, _ = encode_prompt(models.text_encoder, models.processor, ["x"], [[]], variant="edit_plus")
    assert one.shape[1] < two.shape[1] and none.shape[1] < one.shape[1]


def test_vae_latents_are_normalised_per_channel(models) -> None:
    vae = models.vae
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = vae_encode(vae, x)
    raw = vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    torch.testing.assert_close(vae_decode(vae, z), vae.decode(raw.unsqueeze(2)).sample[:, :, 0], rtol=1e-4, atol=1e-5)
