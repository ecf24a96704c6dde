"""A pure AdamW and global-norm clipping over dicts of tensors (optax-style ``init`` / ``update``).

``adamw_update`` follows ``torch.optim.AdamW`` operation for operation, so the two produce the same
trajectory. Hyperparameters that change per step (lr) come in as 0-d tensors so a compiled step
does not recompile; the bias corrections are computed in float64 like torch's Python scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """One AdamW step; returns new params and state, leaving the inputs untouched.

        t = t + 1
        p ← p·(1 − lr·λ)
        m ← m + (1 − β1)(g − m)          v ← β2·v + (1 − β2)·g²
        p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)

    Args:
        grads, params: same keys and shapes.
        lr: 0-d tensor (any float dtype).
    """
    b1, b2 = betas
    count = state.updates + 1
    lr64 = lr.to(torch.float64)
    bias1 = 1 - b1**count
    bias2_sqrt = (1 - b2**count).sqrt()
    decay = 1 - lr64 * weight_decay
    new_params: Params = {}
    new_m: Params = {}
    new_v: Params = {}
    for k, p in params.items():
        g = grads[k]
        m = state.exp_avg[k].lerp(g, 1 - b1)
        v = state.exp_avg_sq[k] * b2 + (1 - b2) * g * g
        step_size = (lr64 / bias1).to(p.dtype)
        denom = v.sqrt() / bias2_sqrt.to(p.dtype) + eps
        new_params[k] = p * decay.to(p.dtype) - step_size * (m / denom)
        new_m[k], new_v[k] = m, v
    return new_params, AdamWState(updates=count, exp_avg=new_m, exp_avg_sq=new_v)


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
