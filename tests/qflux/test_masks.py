"""Masked loss and change masks: hypothesis checks of the weighting's identities, and the auto mask
on a pair whose edit touches a known region."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qflux.data.masks import change_mask, pixel_weights
from qflux.diffusion.flow import flow_match_loss

shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))


def _tensors(seed: int, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = shape
    pred, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return pred, target, torch.rand(b, generator=g) + 0.5, torch.rand(b, 1, h, w, generator=g)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_unmasked_weight_1_with_any_mask_is_the_unmasked_loss(shape, seed: int) -> None:  # type: ignore[no-untyped-def]
    pred, target, w, mask = _tensors(seed, shape)
    plain = flow_match_loss(pred, target, w)
    torch.testing.assert_close(flow_match_loss(pred, target, w, pixel_weights(mask, 1.0)), plain)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), unmasked=st.floats(0.0, 2.0))
def test_a_mask_of_all_ones_is_no_mask(shape, seed: int, unmasked: float) -> None:  # type: ignore[no-untyped-def]
    pred, target, w, mask = _tensors(seed, shape)
    ones = torch.ones_like(mask)
    torch.testing.assert_close(flow_match_loss(pred, target, w, pixel_weights(ones, unmasked)),
                               flow_match_loss(pred, target, w))  # fmt: skip


def test_the_weighted_loss_is_the_formula() -> None:
    pred, target, w, mask = _tensors(0, (2, 3, 4, 5))
    p = pixel_weights(mask, 0.25)
    sq = (pred - target) ** 2
    per = [(p[b] * sq[b]).sum() / (p[b].sum() * 3) for b in range(2)]
    torch.testing.assert_close(flow_match_loss(pred, target, w, p), (w * torch.stack(per)).mean())
    # only the masked region counts when the outside weighs 0
    only = pixel_weights((torch.arange(20).view(1, 1, 4, 5) < 10).float().expand(2, 1, 4, 5), 0.0)
    torch.testing.assert_close(flow_match_loss(pred, target, w, only),
                               flow_match_loss(pred[..., :2, :], target[..., :2, :], w))  # fmt: skip


def test_the_auto_mask_finds_the_edited_region() -> None:
    g = torch.Generator().manual_seed(0)
    control = torch.rand(1, 3, 128, 96, generator=g) * 2 - 1
    target = control.clone()
    target[:, :, 32:64, 16:48] = -target[:, :, 32:64, 16:48]  # the edit: a 32×32 region inverted
    target += 0.01 * torch.randn(target.shape, generator=g)  # codec-like noise everywhere
    mask = change_mask(control, target, (16, 12))  # a ×8 VAE's latent grid
    assert mask.shape == (1, 1, 16, 12)
    assert mask[0, 0, 4:8, 2:6].min() == 1.0  # the edit, in latent pixels
    outside = torch.ones(16, 12, dtype=torch.bool)
    outside[2:10, 0:8] = False  # the edit, smoothed and dilated: two latent pixels around it
    assert mask[0, 0][outside].max() < 0.2
