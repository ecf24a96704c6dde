"""The Qwen-Image-Edit training objective as a pure function of (LoRA tensors, batch).

Per sample: the target latents are noised and packed, the packed control latents of each control
image are appended along the sequence, and the transformer (conditioned on the vision-language
prompt embedding) predicts a velocity for every token; the loss is over the target tokens only:

    x_t = (1 − σ)·x0 + σ·ε
    v̂ = F([pack(x_t) ; pack(c_1) ; … ; pack(c_k)], t = σ, text = h, img_shapes)[:, :N]
    loss = mean_b w(σ_b) · mean (v̂ − (ε − x0))²

Noising, target, weights and loss are :func:`qflux.diffusion.flow.flow_loss`, shared with FLUX.1 Kontext.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch

from qflux.diffusion.flow import MSE, FlowBatch, Objective, Velocity, flow_loss
from qflux.diffusion.latents import pack_sequence, transformer_inputs, unpack_latents
from qflux.diffusion.routing import route_kwargs
from qflux.lora.adapter import base_adapter, call_with_lora
from qflux.weights.dtypes import compute_dtype


@attrs.frozen(eq=False, kw_only=True)
class QwenImageEditBatch(FlowBatch):
    """A training micro-batch: x0 (normalised by the VAE's mean and std), ε, σ and change mask
    (:class:`~qflux.diffusion.flow.FlowBatch`) and Qwen-Image-Edit's conditioning."""

    controls: tuple[torch.Tensor, ...]
    """Control latents, one [B, C, hc_k, wc_k] per control image (float32; zeros where dropped)."""
    embeds: torch.Tensor
    """Vision-language prompt embedding h [B, S, D]."""
    mask: torch.Tensor
    """[B, S] long: 1 for real tokens, 0 for padding."""

    def prompt(self) -> dict[str, torch.Tensor]:
        """The prompt tensors under :attr:`qflux.train.batch.Conditioning.text`'s names (those of ``preserve``)."""
        return {"embeds": self.embeds, "mask": self.mask}


def img_shapes(
    batch: int, latent_hw: tuple[int, int], control_hws: Sequence[tuple[int, int]]
) -> list[list[tuple[int, int, int]]]:
    """The transformer's ``img_shapes``: per sample, (frames, h/2, w/2) of the target latents and of
    each control image's latents (the 2×2-packed token grids, in sequence order)."""
    shapes = [(1, h // 2, w // 2) for h, w in (latent_hw, *control_hws)]
    return [list(shapes) for _ in range(batch)]


def transformer_velocity(
    transformer: Any,
    params: Mapping[str, torch.Tensor],
    tokens: torch.Tensor,
    n: int,
    sigmas: torch.Tensor,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    shapes: list[list[tuple[int, int, int]]],
    *,
    dtype: torch.dtype,
    route: torch.Tensor | None = None,
) -> torch.Tensor:
    """One QwenImage transformer call on [target ; control] tokens; the first ``n`` tokens' output.

    Args:
        params: LoRA tensors substituted into the module, ``{}`` for the module as it is.
        tokens: packed [B, N + Nc, 4C]; sigmas: [B]; embeds: [B, S, D]; mask: [B, S] or None.
        shapes: :func:`img_shapes`.
        dtype: the transformer's compute dtype (:func:`qflux.weights.dtypes.compute_dtype` walks the
            modules: read it once per loss function or denoising loop, not per call).
        route: the target tokens' routing scores [n] (training with ``train.route``), or None.

    Returns:
        [B, n, 4C] in the transformer's dtype.
    """
    inputs = transformer_inputs(tokens, sigmas, embeds, dtype, encoder_hidden_states_mask=mask, img_shapes=shapes,
                                attention_kwargs=route_kwargs(route))  # fmt: skip
    out = call_with_lora(transformer, params, inputs)[0]
    return out[:, :n]


def make_loss_fn(
    transformer: Any, objective: Objective = MSE
) -> Callable[[Mapping[str, torch.Tensor], QwenImageEditBatch], torch.Tensor]:
    """Close over the frozen (adapted) transformer and the objective; return ``loss_fn(lora, batch)``.

    The returned function is pure: same (lora, batch) gives the same 0-d float32 loss.
    """
    dtype = compute_dtype(transformer)
    base = base_adapter(transformer)

    def loss_fn(lora: Mapping[str, torch.Tensor], batch: QwenImageEditBatch) -> torch.Tensor:
        def on(embeds: torch.Tensor, mask: torch.Tensor) -> Velocity:
            def v(params: Mapping[str, torch.Tensor], noisy: torch.Tensor) -> torch.Tensor:
                b, _, h, w = noisy.shape
                tokens = pack_sequence(noisy, batch.controls)
                shapes = img_shapes(b, (h, w), [(c.shape[-2], c.shape[-1]) for c in batch.controls])
                n = (h // 2) * (w // 2)  # the target's tokens come first
                out = transformer_velocity(
                    transformer, params, tokens, n, batch.sigmas, embeds, mask, shapes, dtype=dtype, route=batch.route
                )
                return unpack_latents(out, h, w)

            return v

        keep = None if batch.preserve is None else on(batch.preserve["embeds"], batch.preserve["mask"])
        return flow_loss(on(batch.embeds, batch.mask), lora, batch, objective, base, keep)

    return loss_fn
