"""build_batch really applies caption and control-image dropout, and draws are keyed by (seed, step, micro)."""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

from qflux.data.dataset import PairDataset, collate_pairs
from qflux.data.pairs import scan_pairs
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext.conditioning import encode_prompt_with, vae_encode
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.train.batch import Draws, sigmas_for
from tests import flux_kontext_batches


def _cfg(caption: float, image: float, **train: object) -> Draws:
    cfg = FluxKontextConfig()
    data = attrs.evolve(cfg.data, caption_dropout_rate=caption, prompt_image_dropout_rate=image)
    return Draws.from_config(data, attrs.evolve(cfg.train, **train))


def build_batch(draws: Draws, models, raw: dict, keys: tuple[int, ...]):
    return flux_kontext_batches.build_batch(draws, models, raw, keys, max_sequence_length=16)


def _raw(tmp_path: Path) -> dict:
    make_synthetic_pairs(tmp_path, 4, seed=0)
    samples = scan_pairs(tmp_path, None, multiple=16)
    ds = PairDataset(samples)
    return collate_pairs([ds[0], ds[2]])  # two 64×64 samples


def _encode(models, prompts: list[str]):
    return encode_prompt_with(models, prompts, 16)


def test_no_dropout_keeps_prompt_and_control(flux_models, tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    batch = build_batch(_cfg(0.0, 0.0), flux_models, raw, (0, 0, 0))
    ref = _encode(flux_models, raw["prompt"])
    torch.testing.assert_close(batch.pooled, ref.pooled)
    torch.testing.assert_close(batch.prompt_embeds, ref.tokens)
    # each sample is encoded alone (as the cache does): bit-equal to one-sample encodes
    for i in range(2):
        one = _encode(flux_models, [raw["prompt"][i]])
        assert torch.equal(batch.pooled[i], one.pooled[0]) and torch.equal(batch.prompt_embeds[i], one.tokens[0])
        assert torch.equal(batch.control_latents[i], vae_encode(flux_models.vae, raw["controls"][0][i : i + 1])[0])
        assert torch.equal(batch.latents[i], vae_encode(flux_models.vae, raw["target"][i : i + 1])[0])
    assert batch.noise.shape == batch.latents.shape == (2, 4, 8, 8)


def test_full_dropout_uses_empty_prompt_and_zero_control(flux_models, tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    batch = build_batch(_cfg(1.0, 1.0), flux_models, raw, (0, 0, 0))
    empty = _encode(flux_models, ["", ""])
    assert torch.equal(batch.pooled, empty.pooled) and torch.equal(batch.prompt_embeds, empty.tokens)
    assert torch.count_nonzero(batch.control_latents) == 0


def test_draws_depend_on_keys_only(flux_models, tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    cfg = _cfg(0.0, 0.0)
    a = build_batch(cfg, flux_models, raw, (0, 5, 0))
    b = build_batch(cfg, flux_models, raw, (0, 5, 0))
    c = build_batch(cfg, flux_models, raw, (0, 6, 0))
    assert torch.equal(a.noise, b.noise) and torch.equal(a.sigmas, b.sigmas)
    assert not torch.equal(a.noise, c.noise)


def test_resolution_shift_moves_sigmas_towards_noise(flux_models) -> None:
    u = torch.tensor([0.2, 0.5, 0.8])
    plain = sigmas_for(_cfg(0, 0, timestep_sampling="logit_normal"), flux_models.scheduler.config, u, (64, 64))
    draws = _cfg(0, 0, timestep_sampling="resolution_shift")
    shifted = sigmas_for(draws, flux_models.scheduler.config, u, (64, 64))
    assert torch.all(shifted > plain)
