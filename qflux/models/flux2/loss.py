"""The FLUX.2 transformer call and training objective, pure functions of (LoRA tensors, inputs).

The target's noised tokens come first, then every reference image's tokens (each at its own T
position); the loss is over the target's tokens only:

    x_t = (1 − σ)·x0 + σ·ε                       (x0: normalised target latents [B, C, h, w])
    v̂ = F([pack(x_t) ; pack(r_1) ; … ; pack(r_k)], t = σ, text = h, positions, g)[:, :N]
        (g: [dev]'s guidance value, ``model.guidance_scale``; [klein] has no guidance input)
    loss = mean_b w(σ_b) · mean (v̂ − (ε − x0))²

Noising, target, weights and loss are :func:`qflux.diffusion.flow.flow_loss`, shared with FLUX.1 Kontext and
Qwen-Image-Edit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from qflux.diffusion.flow import MSE, FlowBatch, Objective, Velocity, flow_loss
from qflux.diffusion.latents import pack_sequence, transformer_inputs, unpack_latents
from qflux.diffusion.routing import route_kwargs
from qflux.lora.adapter import base_adapter, call_with_lora
from qflux.models.flux2.conditioning import reference_ids, target_ids
from qflux.weights.dtypes import compute_dtype


def velocity(
    transformer: Any,
    params: Mapping[str, torch.Tensor],
    tokens: torch.Tensor,
    n: int,
    sigmas: torch.Tensor,
    text: torch.Tensor,
    text_ids: torch.Tensor,
    image_ids: torch.Tensor,
    *,
    dtype: torch.dtype,
    guidance: torch.Tensor | None = None,
    route: torch.Tensor | None = None,
) -> torch.Tensor:
    """One transformer call on [target ; references] tokens; the first ``n`` tokens' velocity.

    Args:
        params: LoRA tensors substituted into the module, ``{}`` for the module as it is.
        tokens: [B, N + Nr, 4C]; sigmas: [B]; text: [B, L, 3D]; text_ids: [B, L, 4]; image_ids: [B, N + Nr, 4].
        guidance: [B] guidance values (float32) for a guidance-distilled transformer, else None.
        route: the target tokens' routing scores [N] (training with ``train.route``), or None.

    Returns:
        [B, n, 4C] in the transformer's dtype.
    """
    inputs = transformer_inputs(tokens, sigmas, text, dtype, txt_ids=text_ids, img_ids=image_ids, guidance=guidance,
                                joint_attention_kwargs=route_kwargs(route))  # fmt: skip
    return call_with_lora(transformer, params, inputs)[0][:, :n]


def token_inputs(noisy: torch.Tensor, references: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """([pack(x_t) ; pack(r_1) ; …] [B, N + Nr, 4C], their positions [B, N + Nr, 4]) from latents
    x_t [B, C, h, w] and references [B, C, h_k, w_k]."""
    b, _, h, w = noisy.shape
    ids = target_ids(b, (h, w), noisy.device)
    if references:
        refs = reference_ids([(r.shape[-2], r.shape[-1]) for r in references], noisy.device).expand(b, -1, -1)
        ids = torch.cat([ids, refs], dim=1)
    return pack_sequence(noisy, references), ids


@attrs.frozen(eq=False, kw_only=True)
class Flux2Batch(FlowBatch):
    """A training micro-batch: x0 (normalised), ε, σ and change mask (:class:`~qflux.diffusion.flow.FlowBatch`)
    and FLUX.2's conditioning."""

    references: tuple[torch.Tensor, ...]
    """Reference latents, one [B, C, h_k, w_k] per reference image (zeros where dropped)."""
    text: torch.Tensor
    """Prompt embedding h [B, L, 3D]."""
    text_ids: torch.Tensor
    """[B, L, 4]."""

    def prompt(self) -> dict[str, torch.Tensor]:
        """The prompt tensors under :attr:`qflux.train.batch.Conditioning.text`'s names (those of ``preserve``)."""
        return {"tokens": self.text, "ids": self.text_ids}


def guidance_values(transformer: Any, guidance_scale: float | None, like: torch.Tensor) -> torch.Tensor | None:
    """[B] float32 values of ``guidance_scale`` (B, device: ``like``'s first axis and device) for a transformer with
    a guidance embedding (``config.guidance_embeds``: FLUX.2 [dev]); None for one without ([klein]).

    Raises:
        ValueError: a guidance-distilled transformer and no ``guidance_scale``.
    """
    if not transformer.config.guidance_embeds:
        return None
    if guidance_scale is None:
        raise ValueError("this FLUX.2 transformer is guidance-distilled (guidance_embeds): give model.guidance_scale")
    return torch.full((like.shape[0],), float(guidance_scale), dtype=torch.float32, device=like.device)


def make_loss_fn(
    transformer: Any, objective: Objective = MSE, *, guidance_scale: float | None = None
) -> Callable[[Mapping[str, torch.Tensor], Flux2Batch], torch.Tensor]:
    """Close over the frozen (adapted) transformer, the objective and (for a guidance-distilled transformer)
    the guidance value; return the pure ``loss_fn(lora, batch)`` (0-d float32)."""
    dtype = compute_dtype(transformer)
    base = base_adapter(transformer)

    def loss_fn(lora: Mapping[str, torch.Tensor], batch: Flux2Batch) -> torch.Tensor:
        guidance = guidance_values(transformer, guidance_scale, batch.sigmas)

        def on(text: torch.Tensor, text_ids: torch.Tensor) -> Velocity:
            def v(params: Mapping[str, torch.Tensor], noisy: torch.Tensor) -> torch.Tensor:
                h, w = noisy.shape[-2], noisy.shape[-1]
                tokens, ids = token_inputs(noisy, batch.references)
                out = velocity(transformer, params, tokens, (h // 2) * (w // 2), batch.sigmas, text, text_ids, ids,
                               dtype=dtype, guidance=guidance, route=batch.route)  # fmt: skip
                return unpack_latents(out.float(), h, w)  # v̂ [B, C, h, w] of the target's tokens

            return v

        keep = None if batch.preserve is None else on(batch.preserve["tokens"], batch.preserve["ids"])
        return flow_loss(on(batch.text, batch.text_ids), lora, batch, objective, base, keep)

    return loss_fn
