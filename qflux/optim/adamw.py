"""A pure AdamW and global-norm clipping over dicts of tensors (optax-style ``init`` / ``update``).

``adamw_update`` follows ``torch.optim.AdamW`` operation for operation, so the two produce the same
trajectory. Hyperparameters that change per step (lr) come in as 0-d tensors so a compiled step
does not recompile; the bias corrections are computed in float64 like torch's Python scalars.

The arithmetic runs on one flat vector per quantity (:func:`flatten`: the tensors concatenated in a
fixed key order), so an update is a dozen whole-vector operations rather than a dozen per tensor (a
LoRA of FLUX.1 holds hundreds of small tensors); the results come back as views of that vector
(:func:`unflatten`), element for element the same numbers as a per-tensor loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

Params = dict[str, torch.Tensor]


class AdamWState(NamedTuple):
    """AdamW moments for each LoRA tensor, and how many updates were applied.

    A NamedTuple (as optax's states are) rather than an attrs record: ``torch.compile`` traces
    its construction inside the compiled step, which it cannot do for frozen attrs classes.
    """

    updates: torch.Tensor
    """0-d float64: updates applied so far (t in the bias corrections)."""
    exp_avg: Params
    """m: first-moment estimate, one tensor per parameter name."""
    exp_avg_sq: Params
    """v: second-moment estimate, one tensor per parameter name."""


def adamw_init(params: Mapping[str, torch.Tensor]) -> AdamWState:
    """Zero moments shaped like ``params``."""
    return AdamWState(
        updates=torch.zeros((), dtype=torch.float64),
        exp_avg={k: torch.zeros_like(p) for k, p in params.items()},
        exp_avg_sq={k: torch.zeros_like(p) for k, p in params.items()},
    )


def flatten(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """The tensors of ``names`` (one dtype and device) concatenated into one vector [Σ numel]."""
    return torch.cat([tensors[k].reshape(-1) for k in names])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Params:
    """Views of ``flat`` shaped like ``like``'s tensors, in its key order (the inverse of :func:`flatten`)."""
    parts = torch.split(flat, [t.numel() for t in like.values()])
    return {k: part.view(t.shape) for (k, t), part in zip(like.items(), parts, strict=True)}


def adamw_flat(
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    count: torch.Tensor,
    *,
    lr: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step on flat vectors (gradient, moments, parameters; ``count``: updates so far).

        t = t + 1
        p ← p·(1 − lr·λ)
        m ← m + (1 − β1)(g − m)          v ← β2·v + (1 − β2)·g²
        p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)

    Returns:
        (p, m, v, t), new tensors.
    """
    b1, b2 = betas
    count = count + 1
    lr64 = lr.to(torch.float64)
    bias1 = 1 - b1**count
    bias2_sqrt = (1 - b2**count).sqrt()
    m = m.lerp(g, 1 - b1)
    v = v * b2 + (1 - b2) * g * g
    step_size = (lr64 / bias1).to(p.dtype)
    denom = v.sqrt() / bias2_sqrt.to(p.dtype) + eps
    p = p * (1 - lr64 * weight_decay).to(p.dtype) - step_size * (m / denom)
    return p, m, v, count


def adamw_update(
    grads: Mapping[str, torch.Tensor],
    state: AdamWState,
    params: Mapping[str, torch.Tensor],
    *,
    lr: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> tuple[Params, AdamWState]:
    """One AdamW step (:func:`adamw_flat`); returns new params and state, leaving the inputs untouched.

    Args:
        grads, params: same keys and shapes.
        lr: 0-d tensor (any float dtype).
    """
    names = list(params)
    p, m, v, count = adamw_flat(
        flatten(grads, names),
        flatten(state.exp_avg, names),
        flatten(state.exp_avg_sq, names),
        flatten(params, names),
        state.updates,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
    )
    return unflatten(p, params), AdamWState(count, unflatten(m, params), unflatten(v, params))


def ema_update(ema: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], decay: float) -> Params:
    """One step of the exponential moving average: e ← d·e + (1 − d)·θ, per tensor (new tensors).

    d = 0 gives θ itself; θ that stays constant is a fixed point (e = θ ⇒ e' = θ)."""
    names = list(ema)
    # one fused multi-tensor kernel for all the LoRA's tensors (as AdamW runs on one flat vector)
    out = torch._foreach_lerp([ema[k] for k in names], [params[k].to(ema[k].dtype) for k in names], 1.0 - decay)
    return dict(zip(names, out, strict=True))


def global_norm(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """‖g‖₂ over all tensors (0-d float32), computed as ``clip_grad_norm_`` does."""
    norms = [torch.linalg.vector_norm(g.float(), 2) for g in grads.values()]
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def clip_by_global_norm(grads: Mapping[str, torch.Tensor], max_norm: float | None) -> tuple[Params, torch.Tensor]:
    """Scale ``grads`` so their global norm is at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``).

    g ← g · min(1, max_norm / (‖g‖ + 1e-6))

    Returns:
        (clipped grads, the norm before clipping as a 0-d tensor).
    """
    norm = global_norm(grads)
    if max_norm is None:
        return dict(grads), norm
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * coef.to(g.dtype) for k, g in grads.items()}, norm


def clip_flat(g: torch.Tensor, max_norm: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip a flat gradient to global norm ``max_norm`` (None: unclipped): g ← g · min(1, max_norm / (‖g‖ + 1e-6)).

    Returns:
        (clipped g, ‖g‖ before clipping as a 0-d float32 tensor).
    """
    norm = torch.linalg.vector_norm(g.float(), 2)
    if max_norm is not None:
        g = g * torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(g.dtype)
    return g, norm
