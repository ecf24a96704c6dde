"""The optimizer, decided once: a record of two pure functions, as optax's ``GradientTransformation``.

    opt = make_optimizer("adamw", betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, max_grad_norm=1.0)
    state = opt.init(params)
    params, state, grad_norm, finite, lr = opt.update(grads, state, params, loss, lr)

An optimizer's own rule (:func:`adamw_rule`, :func:`prodigy_rule`) steps flat vectors; two wrappers
serve every rule (:func:`chained`), on device and without a host sync: :func:`clipped` scales the gradient
to the global norm first (optax's ``clip_by_global_norm``), and :func:`if_finite` keeps the old params and
state when the loss or the norm is not finite (optax's ``apply_if_finite``). Every vector operation runs
on one flat vector per quantity (:func:`flatten`), in the params' key order, so the sums round the same
way on every run and the arithmetic does not grow with the number of tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import attrs
import torch

from qflux.config.schema import OptimizerConfig
from qflux.optim.adamw import AdamWState, Params, adamw_flat, adamw_init, clip_flat, flatten, unflatten
from qflux.optim.prodigy import ProdigyHParams, ProdigyState, prodigy_flat, prodigy_init

OptimizerName = Literal["adamw", "prodigy"]
OptState = AdamWState | ProdigyState
Flat = tuple[torch.Tensor, ...]
"""An optimizer state's per-step quantities, each one flat vector (or a 0-d scalar)."""


class Stepped(NamedTuple):
    """What one update gives back."""

    params: Params
    state: Any
    grad_norm: torch.Tensor
    """‖g‖ before clipping (0-d)."""
    finite: torch.Tensor
    """Whether the loss and the norm were finite, i.e. the update was applied (0-d bool)."""
    lr: torch.Tensor
    """The step's effective learning rate (Prodigy: d·lr), 0 when the update was skipped."""


Update = Callable[[Params, Any, Params, torch.Tensor, torch.Tensor], Stepped]
"""``update(grads, state, params, loss, lr) → Stepped``."""


@attrs.frozen
class Optimizer:
    """An optimizer as two pure functions; its hyperparameters live in their closures."""

    name: OptimizerName
    init: Callable[[Mapping[str, torch.Tensor]], Any]
    update: Update


@attrs.frozen
class Rule:
    """One optimizer's arithmetic on flat vectors, and how its state maps to them and back."""

    flat: Callable[[Any, list[str]], Flat]
    """The state's per-step quantities as flat vectors, in the params' key order."""
    step: Callable[
        [torch.Tensor, torch.Tensor, Flat, Any, list[str], torch.Tensor], tuple[torch.Tensor, Flat, torch.Tensor]
    ]
    """``step(g, p, flat state, state, names, lr) → (p, flat state, the step's lr)``."""
    rebuild: Callable[[Flat, Any, Params], Any]
    """The state record of new flat quantities (``state`` for what does not change)."""


def adamw_rule(*, betas: tuple[float, float], eps: float, weight_decay: float) -> Rule:
    """AdamW as torch.optim.AdamW computes it (:func:`qflux.optim.adamw.adamw_flat`)."""

    def flat(state: AdamWState, names: list[str]) -> Flat:
        return flatten(state.exp_avg, names), flatten(state.exp_avg_sq, names), state.updates

    def step(g: torch.Tensor, p: torch.Tensor, old: Flat, state: AdamWState, names: list[str], lr: torch.Tensor
             ) -> tuple[torch.Tensor, Flat, torch.Tensor]:  # fmt: skip
        m, v, count = old
        p, m, v, count = adamw_flat(g, m, v, p, count, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        return p, (m, v, count), lr.detach()

    def rebuild(new: Flat, state: AdamWState, params: Params) -> AdamWState:
        m, v, count = new
        return AdamWState(count, unflatten(m, params), unflatten(v, params))

    return Rule(flat, step, rebuild)


def prodigy_rule(hp: ProdigyHParams, *, betas: tuple[float, float], eps: float, weight_decay: float) -> Rule:
    """Prodigy as prodigyopt computes it (:func:`qflux.optim.prodigy.prodigy_flat`); the lr is d·lr."""

    def flat(state: ProdigyState, names: list[str]) -> Flat:
        return (flatten(state.exp_avg, names), flatten(state.exp_avg_sq, names), flatten(state.s, names),
                state.updates, state.d, state.d_max, state.d_numerator)  # fmt: skip

    def step(g: torch.Tensor, p: torch.Tensor, old: Flat, state: ProdigyState, names: list[str], lr: torch.Tensor
             ) -> tuple[torch.Tensor, Flat, torch.Tensor]:  # fmt: skip
        p0 = flatten(state.p0, names)
        return prodigy_flat(g, p, old, p0, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hp=hp)  # type: ignore[arg-type]

    def rebuild(new: Flat, state: ProdigyState, params: Params) -> ProdigyState:
        m, v, s, k, d, d_max, numerator = new
        return ProdigyState(k, d, d_max, numerator, unflatten(m, params), unflatten(v, params), unflatten(s, params),
                            state.p0)  # fmt: skip

    return Rule(flat, step, rebuild)


def clipped(g: torch.Tensor, max_grad_norm: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The wrapper before every rule: ``g`` scaled to at most ``max_grad_norm`` (None: unscaled), and ‖g‖.

    g ← g · min(1, max_norm / (‖g‖ + 1e-6))
    """
    return clip_flat(g, max_grad_norm)


def if_finite(ok: torch.Tensor, new: Flat, old: Flat) -> Flat:
    """The wrapper after every rule: the new quantities where ``ok``, else the old (on device: no host sync)."""
    return tuple(torch.where(ok.to(a.device), a, b) for a, b in zip(new, old, strict=True))


def chained(rule: Rule, max_grad_norm: float | None) -> Update:
    """``rule`` between its two wrappers, on one flat vector per quantity (the arithmetic does not grow with
    the number of tensors): clip, step, keep the old params and state unless the loss and ‖g‖ are finite."""

    def update(grads: Params, state: Any, params: Params, loss: torch.Tensor, lr: torch.Tensor) -> Stepped:
        names = list(params)
        g, norm = clipped(flatten(grads, names), max_grad_norm)
        p0, old = flatten(params, names), rule.flat(state, names)
        p, new, step_lr = rule.step(g, p0, old, state, names, lr)
        ok = torch.isfinite(loss) & torch.isfinite(norm)
        (p, step_lr), new = if_finite(ok, (p, step_lr), (p0, torch.zeros_like(step_lr))), if_finite(ok, new, old)
        return Stepped(unflatten(p, params), rule.rebuild(new, state, params), norm, ok, step_lr)

    return update


def make_optimizer(
    name: OptimizerName = "adamw",
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
    prodigy: ProdigyHParams | None = None,
) -> Optimizer:
    """The optimizer ``name``: its rule, clipped to ``max_grad_norm`` and skipped when not finite."""
    if name == "prodigy":
        hp = prodigy or ProdigyHParams()
        rule = prodigy_rule(hp, betas=betas, eps=eps, weight_decay=weight_decay)
        return Optimizer(name, lambda params: prodigy_init(params, hp.d0), chained(rule, max_grad_norm))
    rule = adamw_rule(betas=betas, eps=eps, weight_decay=weight_decay)
    return Optimizer(name, adamw_init, chained(rule, max_grad_norm))


def optimizer_from_config(opt: OptimizerConfig, max_grad_norm: float | None) -> Optimizer:
    """The configured optimizer (``optimizer`` section; ``train.max_grad_norm``): decided here, once."""
    prodigy = ProdigyHParams(opt.d0, opt.d_coef, opt.use_bias_correction, opt.safeguard_warmup)
    return make_optimizer(opt.name, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
                          max_grad_norm=max_grad_norm, prodigy=prodigy if opt.name == "prodigy" else None)  # fmt: skip
