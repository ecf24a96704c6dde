"""Packing and ids: properties, and equality with diffusers' FluxKontextPipeline helpers."""

from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline
from hypothesis import given
from hypothesis import strategies as st

from qflux.diffusion.latents import latent_image_ids, pack_latents, unpack_latents

dims = st.integers(1, 4).map(lambda n: 2 * n)


@given(b=st.integers(1, 3), c=st.integers(1, 5), h=dims, w=dims, seed=st.integers(0, 2**16))
def test_unpack_inverts_pack(b: int, c: int, h: int, w: int, seed: int) -> None:
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))
    tokens = pack_latents(x)
    assert tokens.shape == (b, (h // 2) * (w // 2), 4 * c)
    assert torch.equal(unpack_latents(tokens, h, w), x)


@given(b=st.integers(1, 3), c=st.integers(1, 5), h=dims, w=dims)
def test_pack_matches_diffusers(b: int, c: int, h: int, w: int) -> None:
    x = torch.randn(b, c, h, w)
    ref = FluxKontextPipeline._pack_latents(x, b, c, h, w)
    assert torch.equal(pack_latents(x), ref)
    # diffusers unpacks from the pixel size with vae_scale_factor 8
    assert torch.equal(unpack_latents(ref, h, w), FluxKontextPipeline._unpack_latents(ref, h * 8, w * 8, 8))


@given(h=dims, w=dims, index=st.integers(0, 1))
def test_ids_match_diffusers(h: int, w: int, index: int) -> None:
    ref = FluxKontextPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    ref[..., 0] = index
    assert torch.equal(latent_image_ids(h, w, index=index), ref)
