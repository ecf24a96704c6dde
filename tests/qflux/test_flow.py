"""Flow-matching maths: endpoints, loss properties, and agreement with the diffusers scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
from hypothesis import given
from hypothesis import strategies as st

from qflux.diffusion import flow

shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@given(shape=shapes, seed=st.integers(0, 1000))
def test_noising_endpoints(shape: tuple[int, ...], seed: int) -> None:
    x0, eps = _randn(shape, seed), _randn(shape, seed + 1)
    b = shape[0]
    assert torch.equal(flow.add_noise(x0, eps, torch.zeros(b)), x0)
    assert torch.equal(flow.add_noise(x0, eps, torch.ones(b)), eps)


@given(
    shape=shapes,
    seed=st.integers(0, 1000),
    scheme=st.sampled_from(["none", "cosmap", "sigma_sqrt"]),
)
def test_loss_nonnegative_and_zero_at_target(shape: tuple[int, ...], seed: int, scheme: str) -> None:
    pred, target = _randn(shape, seed), _randn(shape, seed + 1)
    sig = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) * 0.98 + 0.01
    w = flow.loss_weights(scheme, sig)  # type: ignore[arg-type]
    assert flow.flow_match_loss(pred, target, w) >= 0
    assert flow.flow_match_loss(target, target, w) == 0


def test_loss_formula() -> None:
    pred = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    w = torch.tensor([1.0, 0.5])
    # sample 0: (1 + 4)/2 = 2.5; sample 1: 0.5·(4 + 0)/2 = 1.0; mean 1.75
    assert flow.flow_match_loss(pred, target, w).item() == pytest.approx(1.75)


def test_discrete_sigmas_match_scheduler_table() -> None:
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    u = torch.linspace(0, 0.9999, 997)
    idx = (u * 1000).long()
    expected = sched.sigmas[idx]
    assert torch.allclose(flow.sigmas_from_u(u), expected, rtol=0, atol=1e-7)
    assert torch.allclose(flow.sigmas_from_u(u) * 1000, sched.timesteps[idx], rtol=0, atol=1e-4)


@given(u=st.floats(0, 0.999999))
def test_sigmas_in_unit_interval(u: float) -> None:
    s = flow.sigmas_from_u(torch.tensor([u]))
    assert 0 < s.item() <= 1


@given(mu=st.floats(-2, 3))
def test_time_shift_fixes_endpoints_and_is_monotone(mu: float) -> None:
    s = torch.tensor([1e-3, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    shifted = flow.time_shift(s, mu)
    assert shifted[-1].item() == pytest.approx(1.0)
    assert torch.all(shifted[1:] > shifted[:-1])
    assert torch.allclose(flow.time_shift(s, 0.0), s)


def test_time_shift_matches_scheduler() -> None:
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    sigmas = np.linspace(1.0, 1 / 10, 10)
    mu = flow.resolution_mu(1024)
    assert mu == pytest.approx(calculate_shift(1024, 256, 4096, 0.5, 1.15))
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    ours = flow.time_shift(torch.tensor(sigmas, dtype=torch.float64), mu)
    assert torch.allclose(ours.float(), sched.sigmas[:-1], atol=1e-6)


def test_weightings() -> None:
    s = torch.tensor([0.25, 0.5])
    assert torch.equal(flow.loss_weights("none", s), torch.ones(2))
    assert torch.allclose(flow.loss_weights("sigma_sqrt", s), s**-2)
    assert torch.allclose(flow.loss_weights("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "shift", "resolution_shift"])
def test_sample_u_range_and_determinism(scheme: str) -> None:
    kw = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
    a = flow.sample_u(scheme, 256, generator=torch.Generator().manual_seed(3), **kw)  # type: ignore[arg-type]
    b = flow.sample_u(scheme, 256, generator=torch.Generator().manual_seed(3), **kw)  # type: ignore[arg-type]
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


kinds = st.sampled_from(list(flow.LOSS_KINDS))


@given(shape=shapes, seed=st.integers(0, 1000), kind=kinds, c=st.floats(0.01, 10.0))
def test_every_loss_kind_is_zero_at_the_target_and_positive_elsewhere(shape, seed: int, kind, c: float) -> None:  # type: ignore[no-untyped-def]
    pred, target = _randn(shape, seed), _randn(shape, seed + 1)
    w = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) + 0.1
    assert flow.flow_match_loss(target, target, w, kind=kind, c=c) == 0
    assert flow.flow_match_loss(pred, target, w, kind=kind, c=c) > 0
    assert (flow.elementwise_loss(pred, target, kind, c) >= 0).all()


@given(shape=shapes, seed=st.integers(0, 1000), kind=st.sampled_from(["huber", "pseudo_huber"]))
def test_huber_kinds_tend_to_mse_as_c_grows(shape, seed: int, kind) -> None:  # type: ignore[no-untyped-def]
    pred, target = _randn(shape, seed), _randn(shape, seed + 1)
    w = torch.ones(shape[0])
    mse = flow.flow_match_loss(pred, target, w)
    far = [abs(flow.flow_match_loss(pred, target, w, kind=kind, c=c) - mse).item() for c in (3.0, 30.0, 3000.0)]
    assert far[2] <= far[1] <= far[0] and far[2] < 1e-4 * (1 + mse.item())
    # below c, huber is mse exactly; above, it grows linearly: 2c|d| − c²
    d = torch.tensor([0.05, -0.2, 3.0])
    assert torch.allclose(flow.elementwise_loss(d, torch.zeros(3), "huber", 0.5), torch.tensor([0.0025, 0.04, 2.75]))


@given(shape=shapes, seed=st.integers(0, 1000), kind=kinds, u=st.floats(0.0, 1.0))
def test_a_mask_of_ones_gives_the_unmasked_loss(shape, seed: int, kind, u: float) -> None:  # type: ignore[no-untyped-def]
    b, _, h, w = shape
    pred, target = _randn(shape, seed), _randn(shape, seed + 1)
    weights = torch.rand(b, generator=torch.Generator().manual_seed(seed)) + 0.1
    pixel = flow.pixel_weights(torch.ones(b, 1, h, w), u)
    plain = flow.flow_match_loss(pred, target, weights, kind=kind)
    assert torch.allclose(flow.flow_match_loss(pred, target, weights, pixel, kind=kind), plain, rtol=1e-5)


def _linear_velocity(params, noisy: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """v̂ = a·x_t: a model of one parameter, a = 1 without an adapter (the base model)."""
    return params.get("a", torch.tensor(1.0)) * noisy


@given(shape=shapes, seed=st.integers(0, 1000), kind=kinds, lam=st.floats(0.0, 10.0))
def test_preservation_is_the_base_models_prediction_outside_the_mask(shape, seed: int, kind, lam: float) -> None:  # type: ignore[no-untyped-def]
    b, _, h, w = shape
    x0, eps = _randn(shape, seed), _randn(shape, seed + 1)
    g = torch.Generator().manual_seed(seed)
    m, sigmas = torch.rand(b, 1, h, w, generator=g), torch.rand(b, generator=g) * 0.9 + 0.05
    batch = flow.FlowBatch(latents=x0, noise=eps, sigmas=sigmas, change=m)
    plain = flow.Objective(loss=kind, unmasked_weight=0.25)
    kept = flow.Objective(loss=kind, unmasked_weight=0.25, preserve="base", preserve_weight=lam)
    lora, base = {"a": torch.tensor(1.7)}, {}
    data = flow.flow_loss(_linear_velocity, lora, batch, plain)
    # pred = base: nothing to preserve; a mask of ones: nowhere to preserve; λ = 0: no weight
    assert flow.flow_loss(_linear_velocity, {}, batch, kept, base) == flow.flow_loss(_linear_velocity, {}, batch, plain)
    ones = flow.FlowBatch(latents=x0, noise=eps, sigmas=sigmas, change=torch.ones(b, 1, h, w))
    assert flow.flow_loss(_linear_velocity, lora, ones, kept, base) == flow.flow_loss(
        _linear_velocity, lora, ones, plain
    )
    # otherwise: data + mean_b mean λ(1 − m)·ℓ(v̂ − v̂_base)
    noisy = flow.add_noise(x0, eps, sigmas)
    extra = (lam * (1 - m) * flow.elementwise_loss(1.7 * noisy, noisy, kind)).reshape(b, -1).mean(1).mean()
    assert torch.allclose(flow.flow_loss(_linear_velocity, lora, batch, kept, base), data + extra, rtol=1e-5)


def test_preservation_needs_a_mask_and_the_base() -> None:
    batch = flow.FlowBatch(latents=torch.zeros(1, 1, 2, 2), noise=torch.ones(1, 1, 2, 2), sigmas=torch.ones(1))
    with pytest.raises(ValueError, match="change mask"):
        flow.flow_loss(_linear_velocity, {}, batch, flow.Objective(preserve="base"), {})


@given(shape=shapes, seed=st.integers(0, 1000), kind=kinds, lam=st.floats(0.0, 10.0))
def test_a_preserve_prompt_pulls_its_prediction_to_the_base_models(shape, seed: int, kind, lam: float) -> None:  # type: ignore[no-untyped-def]
    b = shape[0]
    x0, eps = _randn(shape, seed), _randn(shape, seed + 1)
    sigmas = torch.rand(b, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05
    batch = flow.FlowBatch(latents=x0, noise=eps, sigmas=sigmas)
    objective = flow.Objective(loss=kind, preserve_weight=lam)

    def on_prompt(params, noisy):  # type: ignore[no-untyped-def]
        """The model on another prompt: v̂ = a·x_t + 1 (a = 1 without an adapter)."""
        return params.get("a", torch.tensor(1.0)) * noisy + 1.0

    lora, base = {"a": torch.tensor(0.6)}, {}
    data = flow.flow_loss(_linear_velocity, lora, batch, objective)
    # at ΔW = 0 the term is 0; otherwise + mean_b mean λ·ℓ(v̂_P − v̂_base,P)
    assert flow.flow_loss(_linear_velocity, {}, batch, objective, base, on_prompt) == flow.flow_loss(
        _linear_velocity, {}, batch, objective
    )
    noisy = flow.add_noise(x0, eps, sigmas)
    extra = (lam * flow.elementwise_loss(0.6 * noisy + 1, noisy + 1, kind)).reshape(b, -1).mean(1).mean()
    got = flow.flow_loss(_linear_velocity, lora, batch, objective, base, on_prompt)
    assert torch.allclose(got, data + extra, rtol=1e-5, atol=1e-7)
