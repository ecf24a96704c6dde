"""The Kontext objective and the pure train step.

The loss must equal the way diffusers' ``train_dreambooth_lora_flux_kontext.py`` computes it from
the same latents, noise and timesteps; the step must be pure, seeded and engine-independent.
"""

from __future__ import annotations

import copy
from pathlib import Path

import attrs
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3
from hypothesis import given, settings
from hypothesis import strategies as st

from qflux.config.schema import LoraConfig
from qflux.diffusion.flow import Objective, sigmas_from_u
from qflux.lora.adapter import inject_lora
from qflux.models.flux_kontext.loaders import FLUX_KONTEXT
from qflux.models.flux_kontext.loss import FluxKontextBatch, make_loss_fn, velocity
from qflux.optim.transform import make_optimizer
from qflux.train.state import StepHParams, init_train_state, train_step
from qflux.weights.loading import load_part


@pytest.fixture(scope="module")
def lora_transformer(tiny_flux_dir: Path):
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    lora = inject_lora(tr, LoraConfig(r=4, lora_alpha=8, target_modules=("to_q", "to_k", "to_v", "to_out.0")), seed=0)
    return tr, lora


def _batch(seed: int, b: int = 2, hw: tuple[int, int] = (6, 8), chw: tuple[int, int] = (4, 8)) -> FluxKontextBatch:
    g = torch.Generator().manual_seed(seed)
    return FluxKontextBatch(
        latents=torch.randn(b, 4, *hw, generator=g),
        control_latents=torch.randn(b, 4, *chw, generator=g),
        pooled=torch.randn(b, 32, generator=g),
        prompt_embeds=torch.randn(b, 7, 32, generator=g),
        noise=torch.randn(b, 4, *hw, generator=g),
        sigmas=sigmas_from_u(torch.rand(b, generator=g)),
    )


def _perturbed(lora: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in lora.items()}


def _reference_loss(
    transformer, batch: FluxKontextBatch, timesteps: torch.Tensor, guidance_scale: float, scheme: str
) -> torch.Tensor:
    """Lines of train_dreambooth_lora_flux_kontext.py (diffusers examples), applied to the same inputs."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    model_input, noise, cond_model_input = batch.latents, batch.noise, batch.control_latents
    bsz = model_input.shape[0]
    vae_scale_factor = 8
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[step_indices].flatten()
    while len(sigmas.shape) < model_input.ndim:
        sigmas = sigmas.unsqueeze(-1)
    latent_image_ids = FluxKontextPipeline._prepare_latent_image_ids(
        bsz, model_input.shape[2] // 2, model_input.shape[3] // 2, "cpu", torch.float32
    )
    cond_latents_ids = FluxKontextPipeline._prepare_latent_image_ids(
        bsz, cond_model_input.shape[2] // 2, cond_model_input.shape[3] // 2, "cpu", torch.float32
    )
    cond_latents_ids[..., 0] = 1
    latent_image_ids = torch.cat([latent_image_ids, cond_latents_ids], dim=0)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed_noisy_model_input = FluxKontextPipeline._pack_latents(
        noisy_model_input, bsz, model_input.shape[1], model_input.shape[2], model_input.shape[3]
    )
    orig_inp_shape = packed_noisy_model_input.shape
    packed_cond_input = FluxKontextPipeline._pack_latents(
        cond_model_input, bsz, cond_model_input.shape[1], cond_model_input.shape[2], cond_model_input.shape[3]
    )
    packed_noisy_model_input = torch.cat([packed_noisy_model_input, packed_cond_input], dim=1)
    guidance = torch.tensor([guidance_scale]).expand(bsz)
    text_ids = torch.zeros(batch.prompt_embeds.shape[1], 3)
    model_pred = transformer(
        hidden_states=packed_noisy_model_input,
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=batch.pooled,
        encoder_hidden_states=batch.prompt_embeds,
        txt_ids=text_ids,
        img_ids=latent_image_ids,
        return_dict=False,
    )[0]
    model_pred = model_pred[:, : orig_inp_shape[1], :]
    model_pred = FluxKontextPipeline._unpack_latents(
        model_pred,
        height=model_input.shape[2] * vae_scale_factor,
        width=model_input.shape[3] * vae_scale_factor,
        vae_scale_factor=vae_scale_factor,
    )
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean()


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_equals_diffusers_script(lora_transformer, scheme: str) -> None:
    tr, lora = lora_transformer
    batch = _batch(0)
    u = torch.tensor([0.1234, 0.87])
    timesteps = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True).timesteps[
        (u * 1000).long()
    ]
    batch = attrs.evolve(batch, sigmas=sigmas_from_u(u))
    trained = _perturbed(lora, 1)
    ours = make_loss_fn(tr, Objective(weighting_scheme=scheme), guidance_scale=2.5)(trained, batch)  # type: ignore[arg-type]
    ref_module = copy.deepcopy(tr)
    ref_module.load_state_dict(trained, strict=False)
    ref = _reference_loss(ref_module, batch, timesteps, 2.5, scheme)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@given(seed=st.integers(0, 10_000))
def test_zero_b_lora_equals_base(lora_transformer, seed: int) -> None:
    tr, lora = lora_transformer
    g = torch.Generator().manual_seed(seed)
    zero_b = {
        k: (torch.zeros_like(v) if ".lora_B." in k else torch.randn(v.shape, generator=g)) for k, v in lora.items()
    }
    b = _batch(seed, b=1)
    args = (b.latents, b.control_latents, b.sigmas, b.pooled, b.prompt_embeds, torch.tensor([2.5]))
    with_lora = velocity(tr, zero_b, *args, dtype=torch.float32)
    base = velocity(tr, {}, *args, dtype=torch.float32)
    assert torch.equal(with_lora, base)


def _hp(engine: str = "func") -> StepHParams:
    return StepHParams(engine=engine)  # type: ignore[arg-type]  # AdamW (0.9, 0.999), eps 1e-8, decay 0.01, norm 1


@settings(max_examples=6)
@given(seed=st.integers(0, 10_000), n_micro=st.integers(1, 2), engine=st.sampled_from(["func", "autograd"]))
def test_train_step_does_not_mutate_and_is_bitwise_reproducible(
    lora_transformer, seed: int, n_micro: int, engine: str
) -> None:
    tr, lora = lora_transformer
    loss_fn = make_loss_fn(tr, guidance_scale=2.5)
    state = init_train_state(_perturbed(lora, seed), seed=seed)
    batches = [_batch(seed + 1 + i) for i in range(n_micro)]
    snapshot = {k: v.clone() for k, v in state.lora.items()}
    batch_snap = [(b.latents.clone(), b.noise.clone(), b.sigmas.clone()) for b in batches]
    kw = {"loss_fn": loss_fn, "lr": torch.tensor(1e-3), "hp": _hp(engine), "module": tr}
    new1, m1 = train_step(state, batches, **kw)
    new2, m2 = train_step(state, batches, **kw)
    assert state.step == 0 and new1.step == 1
    assert all(torch.equal(state.lora[k], snapshot[k]) for k in snapshot)
    assert all(torch.equal(state.opt.exp_avg[k], torch.zeros_like(v)) for k, v in snapshot.items())
    assert state.opt.updates.item() == 0
    for b, (lat, eps, sig) in zip(batches, batch_snap, strict=True):
        assert torch.equal(b.latents, lat) and torch.equal(b.noise, eps) and torch.equal(b.sigmas, sig)
    assert all(torch.equal(new1.lora[k], new2.lora[k]) for k in snapshot)
    assert all(torch.equal(new1.opt.exp_avg_sq[k], new2.opt.exp_avg_sq[k]) for k in snapshot)
    assert torch.equal(m1["loss"], m2["loss"]) and m1["finite"].item() == 1.0
    assert any(not torch.equal(new1.lora[k], snapshot[k]) for k in snapshot)


def test_accumulation_equals_mean_of_gradients(lora_transformer) -> None:
    tr, lora = lora_transformer
    loss_fn = make_loss_fn(tr, guidance_scale=2.5)
    state = init_train_state(_perturbed(lora, 5), seed=0)
    big = _batch(6, b=2)
    halves = [
        attrs.evolve(
            big,
            **{f.name: t[i : i + 1] for f in attrs.fields(FluxKontextBatch) if (t := getattr(big, f.name)) is not None},
        )
        for i in range(2)
    ]
    hp = attrs.evolve(_hp(), optimizer=make_optimizer(max_grad_norm=None))
    one, m_one = train_step(state, [big], loss_fn=loss_fn, lr=torch.tensor(1e-2), hp=hp)
    acc, m_acc = train_step(state, halves, loss_fn=loss_fn, lr=torch.tensor(1e-2), hp=hp)
    torch.testing.assert_close(m_one["loss"], m_acc["loss"])
    for k in one.lora:
        torch.testing.assert_close(one.lora[k], acc.lora[k], rtol=1e-5, atol=1e-6)


def test_engines_agree_with_and_without_checkpointing(tiny_flux_dir: Path) -> None:
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    lora = inject_lora(tr, LoraConfig(r=4), seed=0)
    loss_fn = make_loss_fn(tr, guidance_scale=2.5)
    state = init_train_state(_perturbed(lora, 7), seed=0)
    batches = [_batch(8)]
    ref, m_ref = train_step(state, batches, loss_fn=loss_fn, lr=torch.tensor(1e-2), hp=_hp("func"))
    auto, m_auto = train_step(state, batches, loss_fn=loss_fn, lr=torch.tensor(1e-2), hp=_hp("autograd"), module=tr)
    tr.enable_gradient_checkpointing()
    assert tr.gradient_checkpointing
    ckpt, m_ckpt = train_step(state, batches, loss_fn=loss_fn, lr=torch.tensor(1e-2), hp=_hp("autograd"), module=tr)
    for other, m in ((auto, m_auto), (ckpt, m_ckpt)):
        torch.testing.assert_close(m["grad_norm"], m_ref["grad_norm"], rtol=1e-5, atol=1e-7)
        for k in ref.lora:
            torch.testing.assert_close(other.lora[k], ref.lora[k], rtol=1e-5, atol=1e-7)
    # the module's own LoRA stays zeroed: without the dict it is the base model
    assert all(torch.count_nonzero(p) == 0 for n, p in tr.named_parameters() if ".lora_B." in n)


def test_autograd_engine_needs_the_module(lora_transformer) -> None:
    from qflux.train.state import value_and_grad

    tr, lora = lora_transformer
    loss_fn = make_loss_fn(tr, guidance_scale=2.5)
    with pytest.raises(ValueError, match="needs the module"):
        value_and_grad(loss_fn, lora, _batch(0), engine="autograd")


def test_non_finite_step_skips_the_update(lora_transformer) -> None:
    tr, lora = lora_transformer
    loss_fn = make_loss_fn(tr, guidance_scale=2.5)
    state = init_train_state(_perturbed(lora, 11), seed=0)
    good, _ = train_step(state, [_batch(12)], loss_fn=loss_fn, lr=torch.tensor(1e-3), hp=_hp())
    bad_batch = attrs.evolve(_batch(13), noise=torch.full_like(_batch(13).noise, float("nan")))
    after, metrics = train_step(good, [bad_batch], loss_fn=loss_fn, lr=torch.tensor(1e-3), hp=_hp())
    assert metrics["finite"].item() == 0.0 and after.step == good.step + 1
    assert torch.equal(after.opt.updates, good.opt.updates)
    for k in good.lora:
        assert torch.equal(after.lora[k], good.lora[k])
        assert torch.equal(after.opt.exp_avg[k], good.opt.exp_avg[k])
