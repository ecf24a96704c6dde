"""Prodigy (Mishchenko & Defazio, 2023) as a pure ``init`` / ``update`` pair, like optax's
``contrib.prodigy``: Adam whose step size d is estimated from the distance travelled, so the
configured lr is a multiplier of d (1.0 is the usual choice) instead of a tuned rate.

``prodigy_flat`` follows the ``prodigyopt`` package (1.1.2, ``Prodigy.step``, one parameter group,
decoupled weight decay, ``slice_p=1``) operation for operation, on one flat vector per quantity as
:mod:`qflux.optim.adamw` does for AdamW. Its host-side control flow (``if lr > 0``, the early return when
Σ|s| = 0, the float64 scalars d, d_max and the numerator) becomes 0-d float64 tensors and
``torch.where``, so a step never syncs with the host and compiles into the training step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import attrs
import torch

from qflux.optim.adamw import Params


class ProdigyState(NamedTuple):
    """Prodigy's moments and step-size estimate (0-d float64 scalars on the parameters' device)."""

    updates: torch.Tensor
    """k: updates applied so far (the bias corrections' exponent)."""
    d: torch.Tensor
    """The step-size estimate d (starts at d0)."""
    d_max: torch.Tensor
    """The largest estimate so far."""
    d_numerator: torch.Tensor
    """Running Σ β3ᵏ·(d/d0)·dlr·⟨g, p0 − p⟩ (the estimate's numerator)."""
    exp_avg: Params
    """m: running mean of d·g."""
    exp_avg_sq: Params
    """v: running mean of d²·g²."""
    s: Params
    """Running sum of the weighted gradients (the estimate's denominator is Σ|s|)."""
    p0: Params
    """The parameters at initialisation."""


@attrs.frozen
class ProdigyHParams:
    """Prodigy's own constants (betas, eps and weight decay are shared with AdamW)."""

    d0: float = 1e-6
    """Initial estimate of d."""
    d_coef: float = 1.0
    """Multiplier of the estimate d̂ (below 1: smaller steps)."""
    use_bias_correction: bool = False
    """Adam's bias correction folded into the step: dlr = d·lr·√(1 − β2ᵏ⁺¹)/(1 − β1ᵏ⁺¹)."""
    safeguard_warmup: bool = False
    """Leave lr out of s's update (recommended with a warmup)."""
    growth_rate: float = math.inf
    """Most that d may grow per step (a factor)."""


def prodigy_init(params: Mapping[str, torch.Tensor], d0: float = 1e-6) -> ProdigyState:
    """Zero moments and sums shaped like ``params``, d = d_max = d0, and p0 = a copy of ``params``."""
    device = next(iter(params.values())).device
    scalar = torch.zeros((), dtype=torch.float64, device=device)
    return ProdigyState(
        updates=scalar.clone(),
        d=scalar + d0,
        d_max=scalar + d0,
        d_numerator=scalar.clone(),
        exp_avg={k: torch.zeros_like(p) for k, p in params.items()},
        exp_avg_sq={k: torch.zeros_like(p) for k, p in params.items()},
        s={k: torch.zeros_like(p) for k, p in params.items()},
        p0={k: p.detach().clone() for k, p in params.items()},
    )


FlatProdigy = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(m, v, s, k, d, d_max, d_numerator) of a flat step."""


def prodigy_flat(
    g: torch.Tensor,
    p: torch.Tensor,
    state: FlatProdigy,
    p0: torch.Tensor,
    *,
    lr: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    hp: ProdigyHParams,
) -> tuple[torch.Tensor, FlatProdigy, torch.Tensor]:
    """One Prodigy step on flat vectors (gradient, parameters, state, initial parameters).

        dlr = d·lr·bc                       (bc = √(1 − β2ᵏ⁺¹)/(1 − β1ᵏ⁺¹) with bias correction, else 1)
        m ← β1·m + d(1 − β1)·g               v ← β2·v + d²(1 − β2)·g²
        s ← β3·s + (d/d0)·(d or dlr)·g       (β3 = √β2; d with safeguard_warmup)
        N ← β3·N + (d/d0)·dlr·⟨g, p0 − p⟩     d̂ = d_coef·N / Σ|s|
        d_max ← max(d_max, d̂);  d ← min(d_max, d·growth)   (and d ← max(d, d̂) while d = d0)
        p ← p − dlr·λ·p − dlr·m / (√v + d·ε)

    With lr = 0, or while Σ|s| = 0 (no gradient yet), nothing but the moments' decay happens, as in
    ``prodigyopt``; lr = 0 leaves everything as it was.

    Returns:
        (p, new state, dlr): dlr is the step's effective learning rate (0-d float64).
    """
    m, v, s, k, d, d_max, numerator = state
    b1, b2 = betas
    b3 = math.sqrt(b2)
    lr64 = lr.to(torch.float64)
    bias = ((1 - b2 ** (k + 1)) ** 0.5 / (1 - b1 ** (k + 1))) if hp.use_bias_correction else torch.ones_like(k)
    dlr = d * lr64 * bias
    active = lr64 > 0
    delta = (d / hp.d0) * dlr * torch.dot(g, p0 - p).to(torch.float64)
    m1 = m * b1 + g * (d * (1 - b1)).to(g.dtype)
    v1 = v * b2 + g * g * (d * d * (1 - b2)).to(g.dtype)
    s1 = s * b3 + g * ((d / hp.d0) * (d if hp.safeguard_warmup else dlr)).to(g.dtype)
    m, v, s = torch.where(active, m1, m), torch.where(active, v1, v), torch.where(active, s1, s)
    denom_sum = s.abs().sum().to(torch.float64)
    moved = active & (denom_sum > 0)  # prodigyopt returns early (no d, p or k change) otherwise
    new_numerator = numerator * b3 + delta
    d_hat = hp.d_coef * new_numerator / torch.where(moved, denom_sum, torch.ones_like(denom_sum))
    d_next = torch.where(d == hp.d0, torch.maximum(d, d_hat), d)
    d_max_next = torch.maximum(d_max, d_hat)
    d_next = torch.minimum(d_max_next, d_next * hp.growth_rate)
    d, d_max = torch.where(moved, d_next, d), torch.where(moved, d_max_next, d_max)
    numerator = torch.where(moved, new_numerator, numerator)
    denom = v.sqrt() + (d * eps).to(v.dtype)
    stepped = p - p * (weight_decay * dlr).to(p.dtype) - (dlr.to(p.dtype) * (m / denom))
    p = torch.where(moved, stepped, p)
    k = torch.where(moved, k + 1, k)
    return p, (m, v, s, k, d, d_max, numerator), torch.where(moved, dlr, torch.zeros_like(dlr))
