"""encode_prompt and the VAE helpers equal FluxKontextPipeline's own computations."""

from __future__ import annotations

import torch

from qflux.models.flux_kontext.conditioning import encode_prompt, vae_decode, vae_encode


def test_encode_prompt_equals_pipeline(flux_pipe, flux_models) -> None:
    prompts = ["make the image red", "", "flip it, then invert the colors"]
    ours = encode_prompt(
        prompts,
        tokenizer=flux_models.tokenizer,
        text_encoder=flux_models.text_encoder,
        tokenizer_2=flux_models.tokenizer_2,
        text_encoder_2=flux_models.text_encoder_2,
        max_sequence_length=64,
    )
    with torch.no_grad():
        embeds, pooled, text_ids = flux_pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=64)
    assert ours.tokens.shape == (3, 64, 32) and ours.pooled.shape == (3, 32)
    assert torch.equal(ours.tokens, embeds)
    assert torch.equal(ours.pooled, pooled)
    assert torch.equal(text_ids, torch.zeros(64, 3))


def test_vae_encode_equals_pipeline(flux_pipe, flux_models) -> None:
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = vae_encode(flux_models.vae, images)
    assert ours.shape == (2, 4, 6, 8)
    with torch.no_grad():
        ref = flux_pipe._encode_vae_image(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours, ref)


def test_vae_decode_inverts_normalisation(flux_pipe, flux_models) -> None:
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    cfg = flux_pipe.vae.config
    with torch.no_grad():
        ref = flux_pipe.vae.decode(z / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    assert torch.equal(vae_decode(flux_models.vae, z), ref)
