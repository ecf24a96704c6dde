"""The FLUX.2 training loss, [klein]'s and [dev]'s, equals the one computed the pipeline's way (its packing, its
positions for the target and each reference, its transformer call: [dev]'s with the guidance value) on the same
noise, with zero, one and two references; and a LoRA's gradient reaches every adapted layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline

from qflux.config.schema import LoraConfig
from qflux.lora.adapter import inject_lora
from qflux.models.flux2.conditioning import encode_prompt
from qflux.models.flux2.loaders import DEV, KLEIN
from qflux.models.flux2.loss import Flux2Batch, make_loss_fn
from qflux.models.flux2.tiny import build_flux2_dev, build_flux2_klein

GUIDANCE = 3.5


@pytest.fixture(scope="module", params=["klein", "dev"])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    variant, build = {"klein": (KLEIN, build_flux2_klein), "dev": (DEV, build_flux2_dev)}[request.param]
    return variant, variant.files.load(build(tmp_path_factory.mktemp(request.param), seed=5), torch.float32)


def _batch(variant_models, n_refs: int) -> Flux2Batch:  # type: ignore[no-untyped-def]
    variant, models = variant_models
    g = torch.Generator().manual_seed(n_refs)
    c = models.transformer.config.in_channels // 4  # the VAE's latent channels
    prompt = encode_prompt(variant.text, models.text_encoder, models.tokenizer, ["make it red", "swap them"], 64)
    refs = tuple(torch.randn(2, c, *hw, generator=g) for hw in [(6, 8), (10, 4)][:n_refs])
    return Flux2Batch(latents=torch.randn(2, c, 8, 12, generator=g), references=refs, text=prompt.tokens,
                           text_ids=prompt.ids, noise=torch.randn(2, c, 8, 12, generator=g),
                           sigmas=torch.tensor([0.2, 0.9]))  # fmt: skip


def _pipeline_way(transformer, b: Flux2Batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The pipeline's packing on the patchified grid: _patchify_latents, _pack_latents, its ids."""
    pipe = Flux2KleinPipeline
    s = b.sigmas.view(-1, 1, 1, 1)
    x_t = pipe._patchify_latents((1 - s) * b.latents + s * b.noise)
    latents, latent_ids = pipe._pack_latents(x_t), pipe._prepare_latent_ids(x_t)
    hidden, ids = latents, latent_ids
    if b.references:
        refs = [pipe._patchify_latents(r) for r in b.references]
        image_ids = pipe._prepare_image_ids([r[:1] for r in refs]).repeat(2, 1, 1)
        image_latents = torch.cat([pipe._pack_latents(r) for r in refs], dim=1)
        hidden, ids = torch.cat([latents, image_latents], dim=1), torch.cat([latent_ids, image_ids], dim=1)
    t = b.sigmas * 1000
    guidance = torch.full([1], GUIDANCE, dtype=torch.float32).expand(2) if transformer.config.guidance_embeds else None
    out = transformer(hidden_states=hidden, timestep=t / 1000, guidance=guidance, encoder_hidden_states=b.text,
                      txt_ids=b.text_ids, img_ids=ids, return_dict=False)[0][:, : latents.size(1)]  # fmt: skip
    pred = pipe._unpatchify_latents(pipe._unpack_latents_with_ids(out, latent_ids, 4, 6))
    return ((pred.float() - (b.noise - b.latents)) ** 2).mean()


@pytest.mark.parametrize("n_refs", [0, 1, 2])
def test_the_loss_is_the_pipelines(models, n_refs: int) -> None:  # type: ignore[no-untyped-def]
    batch = _batch(models, n_refs)
    transformer = models[1].transformer
    ours = make_loss_fn(transformer, guidance_scale=GUIDANCE)({}, batch)
    torch.testing.assert_close(ours, _pipeline_way(transformer, batch), rtol=1e-5, atol=1e-6)
    if transformer.config.guidance_embeds:  # the guidance value reaches the transformer
        assert not torch.equal(make_loss_fn(transformer, guidance_scale=1.0)({}, batch), ours)
        with pytest.raises(ValueError, match="guidance_scale"):
            make_loss_fn(transformer)({}, batch)


def test_the_lora_gradient_reaches_every_adapted_layer(tmp_path: Path) -> None:
    models = KLEIN.files.load(build_flux2_klein(tmp_path / "m", seed=6), torch.float32)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "ff.linear_in", "ff.linear_out")
    lora = inject_lora(models.transformer, LoraConfig(r=2, target_modules=targets), seed=0)
    loss_fn = make_loss_fn(models.transformer)
    grads = torch.func.grad(loss_fn)(lora, _batch((KLEIN, models), 1))
    assert all(g.abs().sum() > 0 for k, g in grads.items() if ".lora_B." in k)
