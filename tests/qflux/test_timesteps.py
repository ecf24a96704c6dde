"""``train.timestep_sampling``: every sampler draws σ in (0, 1] from the step's keyed generator alone, the same on
1 or N ranks; the shifts move its mean the right way; ``resolution_shift`` is each family's pipeline μ."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qflux.diffusion import flow
from qflux.diffusion.rng import draw_sample_randomness
from qflux.train.batch import Draws, sigmas_for

SAMPLERS = ["uniform", "logit_normal", "mode", "shift", "resolution_shift"]
FLUX_SCHEDULER = SimpleNamespace(num_train_timesteps=1000, base_image_seq_len=256, max_image_seq_len=4096,
                                 base_shift=0.5, max_shift=1.15)  # fmt: skip


def _sigmas(draws: Draws, keys: tuple[int, ...], n: int, hw: tuple[int, int] = (64, 64), first: int = 0):  # type: ignore[no-untyped-def]
    density = {"logit_mean": draws.logit_mean, "logit_std": draws.logit_std, "mode_scale": draws.mode_scale}
    drawn = draw_sample_randomness(keys, n, (1, 2, 2), caption_dropout_rate=0.0, image_dropout_rate=0.0,
                                   timestep_sampling=draws.timestep_sampling, first_index=first, **density)  # fmt: skip
    return sigmas_for(draws, FLUX_SCHEDULER, drawn.u, hw)


@given(sampler=st.sampled_from(SAMPLERS), seed=st.integers(0, 10_000), step=st.integers(0, 10_000),
       shift=st.floats(0.2, 8.0), side=st.sampled_from([2, 16, 64, 128]))  # fmt: skip
def test_every_sampler_is_in_range_keyed_and_the_same_on_any_number_of_ranks(
    sampler: str, seed: int, step: int, shift: float, side: int
) -> None:
    draws = Draws(timestep_sampling=sampler, shift=shift)  # type: ignore[arg-type]
    one = _sigmas(draws, (seed, step, 0), 4, (side, side))
    assert (one > 0).all() and (one <= 1).all()
    assert torch.equal(one, _sigmas(draws, (seed, step, 0), 4, (side, side)))  # the keys alone decide
    # two ranks of two samples each draw what one rank of four does
    halves = torch.cat([_sigmas(draws, (seed, step, 0), 2, (side, side), first=i) for i in (0, 2)])
    assert torch.equal(one, halves)


def _mean(draws: Draws, hw: tuple[int, int] = (64, 64)) -> float:
    return _sigmas(draws, (0, 0, 0), 2000, hw).mean().item()


def test_the_shifts_move_the_mean_the_right_way() -> None:
    base = _mean(Draws(timestep_sampling="logit_normal"))
    assert abs(base - 0.5) < 0.02  # logit-normal(0, 1) is symmetric about 1/2
    assert _mean(Draws(timestep_sampling="shift", shift=3.0)) > base + 0.1  # towards noise
    assert _mean(Draws(timestep_sampling="shift", shift=1 / 3)) < base - 0.1  # towards the image
    assert _mean(Draws(timestep_sampling="shift", shift=1.0)) == base  # s = 1 changes nothing
    assert _mean(Draws(timestep_sampling="logit_normal", logit_mean=1.0)) < base - 0.1  # σ = 1 − u, as diffusers
    # resolution: more tokens, more noise (FLUX.1: μ = 0.5 at 256 tokens, 1.15 at 4096)
    small, large = (_mean(Draws(timestep_sampling="resolution_shift"), hw) for hw in ((32, 32), (128, 128)))
    assert base < small < large
    assert _mean(Draws(timestep_sampling="uniform")) == pytest.approx(0.5, abs=0.02)


@given(s=st.floats(0.05, 20.0), sigma=st.floats(1e-3, 1.0))
def test_a_fixed_shift_is_the_sd3_formula_and_keeps_the_endpoints(s: float, sigma: float) -> None:
    t = torch.tensor([sigma, 1.0], dtype=torch.float64)
    out = flow.shifted_sigmas("shift", t, shift=s)
    assert out[0].item() == pytest.approx(s * sigma / (1 + (s - 1) * sigma), rel=1e-9)
    assert out[1].item() == pytest.approx(1.0)
    assert (out[0] >= t[0]) == (s >= 1) or math.isclose(out[0].item(), sigma, rel_tol=1e-12)


def test_resolution_shift_is_each_pipelines_mu() -> None:
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from qflux.models.flux2.predict import training_mu

    u = torch.tensor([0.1, 0.5, 0.9])
    sigmas = flow.sigmas_from_u(u)
    for hw in ((32, 48), (128, 128)):
        tokens = (hw[0] // 2) * (hw[1] // 2)
        # FLUX.1 Kontext and Qwen-Image-Edit: the linear μ of the scheduler config, as their pipelines compute it
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        got = sigmas_for(Draws(timestep_sampling="resolution_shift"), FLUX_SCHEDULER, u, hw)
        torch.testing.assert_close(got, flow.time_shift(sigmas, mu))
        qwen = SimpleNamespace(num_train_timesteps=1000, base_image_seq_len=256, max_image_seq_len=8192,
                               base_shift=0.5, max_shift=0.9)  # fmt: skip
        got = sigmas_for(Draws(timestep_sampling="resolution_shift"), qwen, u, hw)
        torch.testing.assert_close(got, flow.time_shift(sigmas, calculate_shift(tokens, 256, 8192, 0.5, 0.9)))
        # FLUX.2 [klein]: the pipeline's empirical μ at its default 50 steps
        klein = Draws(timestep_sampling="resolution_shift", mu=training_mu)
        got = sigmas_for(klein, FLUX_SCHEDULER, u, hw)
        torch.testing.assert_close(got, flow.time_shift(sigmas, compute_empirical_mu(tokens, 50)))


def test_the_old_keys_name_the_new_ones() -> None:
    from qflux.config.errors import QfluxError
    from qflux.config.parse import load_config
    from qflux.models.flux_kontext.config import FluxKontextConfig

    for settings, fix in (
        ({"train.weighting_scheme": "logit_normal"}, "logit_normal is now train.timestep_sampling: logit_normal"),
        ({"train.resolution_shift": True}, "it moved to 'train.timestep_sampling: resolution_shift'"),
        ({"train.timestep_shift": 2.0}, "train.timestep_shift is read only by train.timestep_sampling: shift"),
        ({"train.logit_std": 2.0}, "read only by train.timestep_sampling: logit_normal, shift or resolution_shift"),
    ):
        with pytest.raises(QfluxError) as info:
            load_config(FluxKontextConfig, None, settings)
        assert fix in str(info.value)
