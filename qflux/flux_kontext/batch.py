"""Turning a collated image batch into a :class:`FluxKontextBatch`: dropout, encoding and draws.

This runs outside the gradient (``no_grad``), before ``train_step``; all randomness comes from
:func:`qflux.rng.draw_sample_randomness` keyed by (seed, step, micro-batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from qflux.config import FluxKontextConfig
from qflux.data import PairDataset, PairSample, collate_pairs
from qflux.flow import resolution_mu, sigmas_from_u, time_shift
from qflux.flux_kontext.conditioning import encode_prompt_with, vae_encode
from qflux.flux_kontext.loaders import FluxKontextModels
from qflux.flux_kontext.step import FluxKontextBatch
from qflux.rng import draw_sample_randomness


def latent_shape(models: FluxKontextModels, image_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(C, h, w) of the latents of an image of pixel size (H, W): h = H/8, w = W/8 for FLUX."""
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    return models.vae.config.latent_channels, image_hw[0] // factor, image_hw[1] // factor


def sigmas_for(cfg: FluxKontextConfig, models: FluxKontextModels, u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """σ from density draws u; with ``train.resolution_shift`` shifted by the image's token count."""
    sched = models.scheduler.config
    sigmas = sigmas_from_u(u, sched.num_train_timesteps)
    if cfg.train.resolution_shift:
        mu = resolution_mu(
            (hw[0] // 2) * (hw[1] // 2),
            sched.base_image_seq_len,
            sched.max_image_seq_len,
            sched.base_shift,
            sched.max_shift,
        )
        sigmas = time_shift(sigmas, mu)
    return sigmas


@torch.no_grad()
def build_batch(
    cfg: FluxKontextConfig, models: FluxKontextModels, raw: dict[str, Any], keys: tuple[int, ...]
) -> FluxKontextBatch:
    """Encode one collated batch and attach its random draws.

    Args:
        raw: from :func:`qflux.data.collate_pairs`: control [B, 3, Hc, Wc], target [B, 3, H, W], prompts.
        keys: randomness keys, (seed, step, micro_batch).
    """
    target = raw["target"]
    b = target.shape[0]
    shape = latent_shape(models, (target.shape[-2], target.shape[-1]))
    tr = cfg.train
    draws = draw_sample_randomness(
        keys,
        b,
        shape,
        caption_dropout_rate=cfg.data.caption_dropout_rate,
        image_dropout_rate=cfg.data.prompt_image_dropout_rate,
        weighting_scheme=tr.weighting_scheme,
        logit_mean=tr.logit_mean,
        logit_std=tr.logit_std,
        mode_scale=tr.mode_scale,
    )
    prompts = ["" if drop else p for p, drop in zip(raw["prompt"], draws.drop_caption.tolist(), strict=True)]
    embeds = encode_prompt_with(models, prompts, cfg.model.max_sequence_length)
    latents = vae_encode(models.vae, target).float()
    keep = (~draws.drop_image).float().view(b, 1, 1, 1)
    control = vae_encode(models.vae, raw["control"]).float() * keep
    return FluxKontextBatch(
        latents=latents,
        control_latents=control,
        pooled=embeds.pooled,
        prompt_embeds=embeds.tokens,
        noise=draws.noise,
        sigmas=sigmas_for(cfg, models, draws.u, shape[1:]),
    )


def fixed_eval_batches(
    cfg: FluxKontextConfig,
    models: FluxKontextModels,
    samples: Sequence[PairSample],
    *,
    sigmas: Sequence[float] = (0.25, 0.5, 0.75),
    seed: int = 0,
) -> list[FluxKontextBatch]:
    """Deterministic evaluation batches: every sample (one at a time, no dropout) at each fixed σ,
    with noise keyed by (seed, sample index) — the same batches on every call.
    """
    no_dropout = attrs.evolve(cfg, data=attrs.evolve(cfg.data, caption_dropout_rate=0.0, prompt_image_dropout_rate=0.0))
    dataset = PairDataset(samples)
    out = []
    for i in range(len(samples)):
        batch = build_batch(no_dropout, models, collate_pairs([dataset[i]]), (seed, -1, i))
        out += [attrs.evolve(batch, sigmas=torch.full_like(batch.sigmas, s)) for s in sigmas]
    return out
