"""Turning a micro-batch into a :class:`FluxKontextBatch`: conditioning, dropout and random draws.

Conditioning comes either from the encoders (:func:`encode_conditioning`) or from the cache
(:func:`cached_conditioning`); :func:`assemble_batch` then applies the same keyed draws to either,
so training with and without the cache sees identical batches. This all runs outside the gradient,
before ``train_step``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from qflux.config import FluxKontextConfig
from qflux.data import PairDataset, PairSample, collate_pairs
from qflux.flow import resolution_mu, sigmas_from_u, time_shift
from qflux.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_encode
from qflux.flux_kontext.loaders import FluxKontextModels
from qflux.flux_kontext.step import FluxKontextBatch
from qflux.rng import draw_sample_randomness


@attrs.frozen(eq=False)
class Conditioning:
    """A micro-batch's encoded inputs before dropout."""

    latents: torch.Tensor
    """Target latents [B, C, h, w]."""
    control: torch.Tensor
    """Control latents [B, C, hc, wc]."""
    pooled: torch.Tensor
    """CLIP pooled embeddings [B, P]."""
    tokens: torch.Tensor
    """T5 embeddings [B, S, D]."""


@torch.no_grad()
def encode_conditioning(models: FluxKontextModels, raw: dict[str, Any], max_sequence_length: int) -> Conditioning:
    """Encode a collated image batch (:func:`qflux.data.collate_pairs`) with the VAE and text encoders.

    Each sample is encoded on its own, exactly as the cache encodes it, so training with and
    without the cache sees bit-identical conditioning.
    """
    n = len(raw["prompt"])
    embeds = [encode_prompt_with(models, [raw["prompt"][i]], max_sequence_length) for i in range(n)]
    return Conditioning(
        latents=torch.cat([vae_encode(models.vae, raw["target"][i : i + 1]) for i in range(n)]),
        control=torch.cat([vae_encode(models.vae, raw["control"][i : i + 1]) for i in range(n)]),
        pooled=torch.cat([e.pooled for e in embeds]),
        tokens=torch.cat([e.tokens for e in embeds]),
    )


def cached_conditioning(raw: dict[str, Any]) -> Conditioning:
    """Conditioning from a collated cached batch (:func:`qflux.flux_kontext.cache.collate_cached`)."""
    return Conditioning(latents=raw["latent"], control=raw["control"], pooled=raw["pooled"], tokens=raw["tokens"])


def sigmas_for(cfg: FluxKontextConfig, scheduler_config: Any, u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """σ from density draws u; with ``train.resolution_shift`` shifted by the latent's token count.

    Args:
        hw: latent (h, w); the image has (h/2)·(w/2) tokens.
    """
    sc = scheduler_config
    sigmas = sigmas_from_u(u, sc.num_train_timesteps)
    if cfg.train.resolution_shift:
        mu = resolution_mu(
            (hw[0] // 2) * (hw[1] // 2), sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift
        )
        sigmas = time_shift(sigmas, mu)
    return sigmas


@torch.no_grad()
def assemble_batch(
    cfg: FluxKontextConfig,
    scheduler_config: Any,
    cond: Conditioning,
    empty: PromptEmbeds,
    keys: tuple[int, ...],
    device: torch.device | str = "cpu",
    first_index: int = 0,
) -> FluxKontextBatch:
    """Apply caption and control dropout, draw noise and σ, and move everything to ``device``.

    Dropped captions use the empty prompt's embeddings; dropped control images become zero latents.

    Args:
        empty: embeddings of the empty prompt, pooled [1, P] and tokens [1, S, D].
        keys: randomness keys (seed, step, micro-batch); sample i draws from keys + (first_index + i,).
        first_index: this batch's offset in the global batch (data-parallel ranks).
    """
    b, c, h, w = cond.latents.shape
    tr = cfg.train
    draws = draw_sample_randomness(
        keys,
        b,
        (c, h, w),
        caption_dropout_rate=cfg.data.caption_dropout_rate,
        image_dropout_rate=cfg.data.prompt_image_dropout_rate,
        weighting_scheme=tr.weighting_scheme,
        logit_mean=tr.logit_mean,
        logit_std=tr.logit_std,
        mode_scale=tr.mode_scale,
        first_index=first_index,
    )
    drop_c = draws.drop_caption.to(cond.pooled.device)
    pooled = torch.where(drop_c[:, None], empty.pooled.to(cond.pooled), cond.pooled)
    tokens = torch.where(drop_c[:, None, None], empty.tokens.to(cond.tokens), cond.tokens)
    keep = (~draws.drop_image).float().view(b, 1, 1, 1)
    return FluxKontextBatch(
        latents=cond.latents.float().to(device),
        control_latents=(cond.control.float().cpu() * keep).to(device),
        pooled=pooled.to(device),
        prompt_embeds=tokens.to(device),
        noise=draws.noise.to(device),
        sigmas=sigmas_for(cfg, scheduler_config, draws.u, (h, w)).to(device),
    )


def build_batch(
    cfg: FluxKontextConfig,
    models: FluxKontextModels,
    raw: dict[str, Any],
    keys: tuple[int, ...],
    *,
    empty: PromptEmbeds | None = None,
    device: torch.device | str = "cpu",
) -> FluxKontextBatch:
    """Encode a collated image batch and assemble it (the training path without the cache).

    Args:
        empty: the empty prompt's embeddings; encoded here when not given.
    """
    if empty is None:
        empty = encode_prompt_with(models, [""], cfg.model.max_sequence_length)
    cond = encode_conditioning(models, raw, cfg.model.max_sequence_length)
    return assemble_batch(cfg, models.scheduler.config, cond, empty, keys, device)


def eval_batches(
    cfg: FluxKontextConfig,
    scheduler_config: Any,
    conds: Sequence[Conditioning],
    empty: PromptEmbeds,
    *,
    sigmas: Sequence[float] = (0.25, 0.5, 0.75),
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[FluxKontextBatch]:
    """Deterministic evaluation batches: each one-sample conditioning (no dropout) at each fixed σ,
    with noise keyed by (seed, sample index): the same batches on every call."""
    no_dropout = attrs.evolve(cfg, data=attrs.evolve(cfg.data, caption_dropout_rate=0.0, prompt_image_dropout_rate=0.0))
    out = []
    for i, cond in enumerate(conds):
        batch = assemble_batch(no_dropout, scheduler_config, cond, empty, (seed, -1, i), device)
        out += [attrs.evolve(batch, sigmas=torch.full_like(batch.sigmas, s)) for s in sigmas]
    return out


def fixed_eval_batches(
    cfg: FluxKontextConfig,
    models: FluxKontextModels,
    samples: Sequence[PairSample],
    *,
    sigmas: Sequence[float] = (0.25, 0.5, 0.75),
    seed: int = 0,
) -> list[FluxKontextBatch]:
    """:func:`eval_batches` of ``samples`` encoded with ``models`` (one at a time)."""
    dataset = PairDataset(samples)
    empty = encode_prompt_with(models, [""], cfg.model.max_sequence_length)
    seq = cfg.model.max_sequence_length
    conds = [encode_conditioning(models, collate_pairs([dataset[i]]), seq) for i in range(len(samples))]
    return eval_batches(cfg, models.scheduler.config, conds, empty, sigmas=sigmas, seed=seed)
