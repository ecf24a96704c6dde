"""``train.preserve: base`` on a real (tiny) FLUX.1 Kontext transformer: the base model's prediction is the
transformer without the adapter for every adapter kind, whichever engine holds the trained tensors, and
the preservation term is exactly what :func:`qflux.diffusion.flow.preservation_loss` says."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch

from qflux.config.schema import LoraConfig
from qflux.diffusion.flow import Objective, add_noise, elementwise_loss
from qflux.lora.adapter import inject_lora
from qflux.models.flux_kontext.loaders import FLUX_KONTEXT
from qflux.models.flux_kontext.loss import FluxKontextBatch, make_loss_fn, velocity
from qflux.optim.transform import make_optimizer
from qflux.train.state import StepHParams, init_train_state, train_step
from qflux.weights.loading import load_part
from tests.qflux.flux_kontext.test_step import _batch as step_batch
from tests.qflux.flux_kontext.test_step import _perturbed

PLAIN = Objective(unmasked_weight=0.25)
KEPT = Objective(unmasked_weight=0.25, preserve="base", preserve_weight=2.0)


def _batch(seed: int) -> FluxKontextBatch:
    """:func:`tests.qflux.flux_kontext.test_step._batch` (latents 6×8) with its edit on the left half."""
    batch = step_batch(seed, chw=(6, 8))
    mask = torch.zeros(2, 1, 6, 8)
    mask[..., :4] = 1.0
    return attrs.evolve(batch, change=mask)


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
def test_the_base_prediction_is_the_model_without_the_adapter(tiny_flux_dir: Path, kind: str) -> None:
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    lora = inject_lora(tr, LoraConfig(kind=kind, r=4), seed=0)  # type: ignore[arg-type]
    batch = _batch(1)
    plain, kept = make_loss_fn(tr, PLAIN, guidance_scale=2.5), make_loss_fn(tr, KEPT, guidance_scale=2.5)
    # at the start ΔW = 0: the LoRA predicts what the base does, so there is nothing to preserve
    torch.testing.assert_close(kept(lora, batch), plain(lora, batch), rtol=1e-6, atol=0)
    trained = _perturbed(lora, 2)
    noisy = add_noise(batch.latents, batch.noise, batch.sigmas)
    guidance = torch.full((2,), 2.5)
    args = (noisy, batch.control_latents, batch.sigmas, batch.pooled, batch.prompt_embeds, guidance)
    with torch.no_grad():
        ours, base = velocity(tr, trained, *args, dtype=torch.float32), velocity(tr, {}, *args, dtype=torch.float32)
    assert (ours - base).abs().max() > 1e-3
    # + mean_b mean λ(1 − m)(v̂ − v̂_base)²   (w(σ) = 1)
    extra = (2.0 * (1 - batch.change) * elementwise_loss(ours, base)).reshape(2, -1).mean(1).mean()  # type: ignore[operator]
    torch.testing.assert_close(kept(trained, batch), plain(trained, batch) + extra, rtol=1e-5, atol=1e-7)


def test_engines_agree_with_preservation_on(tiny_flux_dir: Path) -> None:
    """The autograd engine holds the trained tensors in the module: the base forward must still see ΔW = 0."""
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    lora = inject_lora(tr, LoraConfig(r=4, target_modules=("all-linear",)), seed=0)
    loss_fn = make_loss_fn(tr, attrs.evolve(KEPT, loss="pseudo_huber", huber_c=0.5), guidance_scale=2.5)
    state = init_train_state(_perturbed(lora, 7), seed=0)
    batches = [_batch(8)]

    def hp(engine: str) -> StepHParams:
        return StepHParams(make_optimizer(), engine=engine)  # type: ignore[arg-type]

    ref, m_ref = train_step(state, batches, loss_fn=loss_fn, lr=torch.tensor(1e-2), hp=hp("func"))
    auto, m_auto = train_step(state, batches, loss_fn=loss_fn, lr=torch.tensor(1e-2), hp=hp("autograd"), module=tr)
    tr.enable_gradient_checkpointing()
    ckpt, m_ckpt = train_step(state, batches, loss_fn=loss_fn, lr=torch.tensor(1e-2), hp=hp("autograd"), module=tr)
    for other, m in ((auto, m_auto), (ckpt, m_ckpt)):
        torch.testing.assert_close(m["loss"], m_ref["loss"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(m["grad_norm"], m_ref["grad_norm"], rtol=1e-5, atol=1e-7)
        for k in ref.lora:
            torch.testing.assert_close(other.lora[k], ref.lora[k], rtol=1e-5, atol=1e-7)
