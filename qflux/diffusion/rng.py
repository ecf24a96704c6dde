"""Explicit, keyed randomness: every draw comes from a generator seeded by (seed, step, ...) keys.

A sample's noise, timestep and dropout draws depend only on the run seed, the optimizer step, the
micro-batch index and the sample's position, never on global RNG state or on what ran before, so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib

import attrs
import torch

from qflux.diffusion.flow import TimestepSampling, sample_u


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a hash of integer keys (distinct keys → independent streams)."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@attrs.frozen(eq=False)
class SampleDraws:
    """The random inputs of one micro-batch."""

    noise: torch.Tensor
    """ε [B, C, h, w] float32."""
    u: torch.Tensor
    """[B] timestep-density draws in [0, 1)."""
    drop_caption: torch.Tensor
    """[B] bool: replace the prompt with the empty prompt."""
    drop_image: torch.Tensor
    """[B] bool: zero the control latents."""


def draw_sample_randomness(
    keys: tuple[int, ...],
    batch_size: int,
    latent_shape: tuple[int, int, int],
    *,
    caption_dropout_rate: float,
    image_dropout_rate: float,
    timestep_sampling: TimestepSampling,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    first_index: int = 0,
) -> SampleDraws:
    """Draw noise, u and dropout decisions for each sample from its own keyed generator.

    Args:
        keys: e.g. (seed, step, micro_batch); sample i uses keys + (first_index + i,).
        latent_shape: (C, h, w) of one sample's target latents.
        first_index: index of this batch's first sample in the global batch (a data-parallel
            rank's offset), so draws do not depend on how the batch is split across ranks.
    """
    noise, u, drop_c, drop_i = [], [], [], []
    for i in range(first_index, first_index + batch_size):
        g = keyed_generator(*keys, i)
        drop_c.append(bool(torch.rand((), generator=g) < caption_dropout_rate))
        drop_i.append(bool(torch.rand((), generator=g) < image_dropout_rate))
        u.append(
            sample_u(
                timestep_sampling, 1, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, generator=g
            )
        )
        noise.append(torch.randn(latent_shape, generator=g))
    return SampleDraws(
        noise=torch.stack(noise),
        u=torch.cat(u).float(),
        drop_caption=torch.tensor(drop_c),
        drop_image=torch.tensor(drop_i),
    )
