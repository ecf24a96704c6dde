"""The FLUX.1 Kontext training objective as a pure function of (LoRA tensors, batch).

Per sample: the target latents are noised, packed and concatenated with the packed control
latents along the sequence; the transformer predicts a velocity for every token and the loss is
taken over the target tokens only:

    x_t = (1 − σ)·x0 + σ·ε
    v̂ = F([pack(x_t) ; pack(c)], t = σ, ids = [(0, i, j) ; (1, i, j)])[:, :N]
    loss = mean_b w(σ_b) · mean ℓ(v̂ − (ε − x0))   (+ preservation: :func:`qflux.diffusion.flow.flow_loss`)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import attrs
import torch

from qflux.diffusion.flow import MSE, FlowBatch, Objective, Velocity, flow_loss
from qflux.diffusion.latents import latent_image_ids, pack_latents, transformer_inputs, unpack_latents
from qflux.diffusion.routing import route_kwargs
from qflux.lora.adapter import base_adapter, call_with_lora
from qflux.weights.dtypes import compute_dtype


@attrs.frozen(eq=False, kw_only=True)
class FluxKontextBatch(FlowBatch):
    """A training micro-batch: x0, ε, σ and change mask (:class:`~qflux.diffusion.flow.FlowBatch`) and
    FLUX.1 Kontext's conditioning."""

    control_latents: torch.Tensor
    """Control latents c [B, C, hc, wc] (float32); zeros where the control image was dropped."""
    pooled: torch.Tensor
    """CLIP pooled prompt embedding [B, P]."""
    prompt_embeds: torch.Tensor
    """T5 prompt embedding [B, S, D]."""

    def prompt(self) -> dict[str, torch.Tensor]:
        """The prompt tensors under :attr:`qflux.train.batch.Conditioning.text`'s names (those of ``preserve``)."""
        return {"pooled": self.pooled, "tokens": self.prompt_embeds}


def kontext_ids(latent_hw: tuple[int, int], control_hw: tuple[int, int]) -> torch.Tensor:
    """Position ids for [target tokens ; control tokens]: index 0 for the target, 1 for the control.

    Returns:
        [N + Nc, 3].
    """
    return torch.cat([latent_image_ids(*latent_hw, index=0), latent_image_ids(*control_hw, index=1)], dim=0)


class TokenLayout(NamedTuple):
    """The parts of the transformer's input that do not change across denoising steps.

    A NamedTuple rather than an attrs record: it is built inside the compiled step, and
    ``torch.compile`` cannot trace the construction of frozen attrs classes.
    """

    control: torch.Tensor | None
    """Packed control tokens [B, Nc, 4C] in the compute dtype, or None for no control image."""
    img_ids: torch.Tensor
    """Position ids of [target tokens ; control tokens]: [N + Nc, 3]."""
    txt_ids: torch.Tensor
    """Position ids of the text tokens (zeros): [S, 3]."""


def token_layout(
    latent_hw: tuple[int, int],
    control: torch.Tensor | None,
    text_len: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> TokenLayout:
    """Pack the control latents [B, C, hc, wc] (or None) and build the position ids for a target
    of ``latent_hw`` latents and ``text_len`` text tokens, in ``dtype`` on ``device``."""
    h, w = latent_hw
    if control is not None:
        ids = kontext_ids((h, w), (control.shape[-2], control.shape[-1]))
        packed: torch.Tensor | None = pack_latents(control.to(device=device, dtype=dtype))
    else:
        ids, packed = latent_image_ids(h, w, index=0), None
    return TokenLayout(
        control=packed,
        img_ids=ids.to(device=device, dtype=dtype),
        txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
    )


def velocity(
    transformer: Any,
    params: Mapping[str, torch.Tensor],
    noisy: torch.Tensor,
    layout: TokenLayout | torch.Tensor | None,
    sigmas: torch.Tensor,
    pooled: torch.Tensor,
    prompt_embeds: torch.Tensor,
    guidance: torch.Tensor | None,
    *,
    dtype: torch.dtype,
    route: torch.Tensor | None = None,
) -> torch.Tensor:
    """One transformer evaluation on [pack(noisy) ; packed control]; the target tokens' velocity.

    Args:
        transformer: ``FluxTransformer2DModel`` (frozen).
        params: tensors substituted into the module (the LoRA); ``{}`` runs the module as it is.
        noisy: x_t [B, C, h, w], on the transformer's device; other inputs are moved there.
        layout: from :func:`token_layout` for this size (its control batch must match B), or the
            control latents [B, C, hc, wc] (or None) to build it from for this call.
        sigmas: [B]; the transformer's timestep input is σ (diffusers passes t/1000 = σ).
        pooled: [B, P]; prompt_embeds: [B, S, D].
        guidance: [B] guidance values, or None for a model without guidance embedding.
        dtype: the transformer's compute dtype (``transformer.dtype``, which walks every module:
            read it once, not every step).
        route: the target tokens' routing scores [N] (training with ``train.route``), or None.

    Returns:
        v̂ [B, C, h, w] in the transformer's output dtype.
    """
    device = noisy.device
    h, w = noisy.shape[-2:]
    if not isinstance(layout, TokenLayout):
        layout = token_layout((h, w), layout, prompt_embeds.shape[1], dtype=dtype, device=device)
    tokens = pack_latents(noisy.to(dtype))
    n = tokens.shape[1]
    if layout.control is not None:
        tokens = torch.cat([tokens, layout.control], dim=1)
    inputs = transformer_inputs(
        tokens,
        sigmas.to(device),
        prompt_embeds.to(device),
        dtype,
        guidance=None if guidance is None else guidance.to(device),
        pooled_projections=pooled.to(device=device, dtype=dtype),
        txt_ids=layout.txt_ids,
        img_ids=layout.img_ids,
        joint_attention_kwargs=route_kwargs(route),
    )
    out = call_with_lora(transformer, params, inputs)[0]
    return unpack_latents(out[:, :n], h, w)


def make_loss_fn(
    transformer: Any, objective: Objective = MSE, *, guidance_scale: float
) -> Callable[[Mapping[str, torch.Tensor], FluxKontextBatch], torch.Tensor]:
    """Close over the frozen (adapted) transformer and the objective; return ``loss_fn(lora, batch)``.

    The returned function is pure: same (lora, batch) gives the same 0-d float32 loss.
    """
    dtype = compute_dtype(transformer)
    base = base_adapter(transformer)

    def loss_fn(lora: Mapping[str, torch.Tensor], batch: FluxKontextBatch) -> torch.Tensor:
        x0 = batch.latents
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((x0.shape[0],), guidance_scale, dtype=torch.float32, device=x0.device)

        def on(pooled: torch.Tensor, embeds: torch.Tensor) -> Velocity:
            def v(params: Mapping[str, torch.Tensor], noisy: torch.Tensor) -> torch.Tensor:
                return velocity(transformer, params, noisy, batch.control_latents, batch.sigmas, pooled, embeds,
                                guidance, dtype=dtype, route=batch.route)  # fmt: skip

            return v

        keep = None if batch.preserve is None else on(batch.preserve["pooled"], batch.preserve["tokens"])
        return flow_loss(on(batch.pooled, batch.prompt_embeds), lora, batch, objective, base, keep)

    return loss_fn
