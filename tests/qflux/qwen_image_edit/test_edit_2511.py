"""Qwen-Image-Edit-2511 (``model.variant: edit_2511``): the training loss on a 2511-shaped tiny model
equals the one computed the pipeline's way (control tokens modulated at t = 0 by the transformer's
``zero_cond_t``), the flag really changes it, and a folder of the other kind is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qflux.config.errors import QfluxError
from qflux.diffusion.latents import pack_latents, unpack_latents
from qflux.models.qwen_image_edit.loaders import check_variant, load_qwen_image_edit
from qflux.models.qwen_image_edit.loss import QwenImageEditBatch, make_loss_fn
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit


@pytest.fixture(scope="module")
def tiny_2511(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_image_edit(tmp_path_factory.mktemp("qwen-2511"), seed=3, variant="edit_2511")


def _batch(models) -> QwenImageEditBatch:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    z = models.transformer.config.out_channels
    dim = models.transformer.config.joint_attention_dim
    return QwenImageEditBatch(
        latents=torch.randn(2, z, 8, 6, generator=g),
        controls=(torch.randn(2, z, 6, 8, generator=g), torch.randn(2, z, 4, 4, generator=g)),
        embeds=torch.randn(2, 7, dim, generator=g),
        mask=torch.ones(2, 7, dtype=torch.long),
        noise=torch.randn(2, z, 8, 6, generator=g),
        sigmas=torch.tensor([0.3, 0.8]),
    )


def _pipeline_way(transformer, b: QwenImageEditBatch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The loss as QwenImageEditPlusPipeline calls its transformer: [latents ; image_latents] with
    img_shapes [[target, control 1, control 2]] * B and timestep = t/1000 = σ; the first N tokens'
    velocity against ε − x0."""
    x_t = (1 - b.sigmas.view(-1, 1, 1, 1)) * b.latents + b.sigmas.view(-1, 1, 1, 1) * b.noise
    latents = pack_latents(x_t)
    image_latents = torch.cat([pack_latents(c) for c in b.controls], dim=1)
    shapes = [[(1, 4, 3), (1, 3, 4), (1, 2, 2)]] * 2
    out = transformer(hidden_states=torch.cat([latents, image_latents], dim=1), timestep=(b.sigmas * 1000) / 1000,
                      guidance=None, encoder_hidden_states_mask=b.mask, encoder_hidden_states=b.embeds,
                      img_shapes=shapes, return_dict=False)[0][:, : latents.size(1)]  # fmt: skip
    pred = unpack_latents(out, 8, 6)
    return ((pred.float() - (b.noise - b.latents)) ** 2).mean()


def test_the_loss_is_the_pipelines_with_controls_at_t_zero(tiny_2511: Path) -> None:
    models = load_qwen_image_edit(tiny_2511, torch.float32, include=("transformer",))
    tr = models.transformer
    assert tr.config.zero_cond_t
    batch = _batch(models)
    loss_fn = make_loss_fn(tr)
    ours = loss_fn({}, batch)
    torch.testing.assert_close(ours, _pipeline_way(tr, batch), rtol=1e-5, atol=1e-6)
    for m in tr.modules():  # the same weights with the control tokens modulated at σ instead of 0
        if hasattr(m, "zero_cond_t"):
            m.zero_cond_t = False
    assert abs(loss_fn({}, batch).item() - ours.item()) > 1e-4


def test_a_folder_of_the_other_kind_is_refused(tiny_2511: Path, tmp_path: Path) -> None:
    check_variant(tiny_2511, "edit_2511")
    with pytest.raises(QfluxError, match=r"set model\.variant: edit_2511"):
        check_variant(tiny_2511, "edit_plus")
    plus = build_qwen_image_edit(tmp_path / "plus", seed=0, variant="edit_plus")
    with pytest.raises(QfluxError, match=r"set model\.variant: edit_plus"):
        check_variant(plus, "edit_2511")
