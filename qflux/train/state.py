"""The training state and the pure training step, shared by every recipe.

``train_step(state, microbatches, ...) -> (state, metrics)`` averages the gradient of a pure
``loss_fn(lora, batch)`` over the micro-batches, clips it, and applies AdamW or Prodigy. It returns a new
state, never mutates its inputs and never syncs with the host: metrics are 0-d tensors that the
recipe reads (``.item()``) only when it logs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import attrs
import torch
from torch import nn
from torch.func import functional_call

from qflux.lora.kinds import module_of
from qflux.optim.adamw import ema_update
from qflux.optim.transform import Optimizer, OptState, make_optimizer
from qflux.weights.fp8 import Float8FrozenLinear
from qflux.weights.frozen_linear import FrozenLinear

Params = dict[str, torch.Tensor]
LossFn = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]
GradEngine = Literal["func", "autograd"]
CompileMode = Literal["none", "full", "regional"]


def resolve_compile(setting: bool | str, device: torch.device) -> CompileMode:
    """``train.compile`` (true | false | auto | regional) as the mode for ``device``.

    ``auto`` is regional on CUDA and none on CPU: on this project's 2-core CPU a 150-step run of
    the tiny model does not earn back a 50-170 s cold compile (benchmarks/README.md).
    """
    if setting == "auto":
        return "regional" if device.type == "cuda" else "none"
    if setting == "regional":
        return "regional"
    return "full" if setting is True else "none"


def grad_engine(mode: CompileMode) -> GradEngine:
    """The gradient engine for a compile mode: ``func`` for the whole-step graph (``torch.compile``
    traces the ``torch.func`` transform), the autograd engine otherwise. Eager, the autograd engine
    does the same work with less overhead per operation (functorch wraps every tensor; measured 20%
    faster on the small model, benchmarks/README.md), and it is the one that recomputes checkpointed
    blocks, runs FSDP2's hooks and differentiates bitsandbytes' 4-bit layers."""
    return "func" if mode == "full" else "autograd"


def compile_regions(module: Any) -> None:
    """Compile each repeated block of ``module`` in place (diffusers' ``compile_repeated_blocks``:
    one graph per block class, reused by every instance), or the whole module if it declares none."""
    if getattr(module, "_repeated_blocks", None):
        module.compile_repeated_blocks(fullgraph=True, dynamic=False)
    else:
        module.compile(fullgraph=True, dynamic=False)


@attrs.frozen(eq=False)
class TrainState:
    """Everything that changes during training; frozen weights are not state."""

    step: int
    """Optimizer steps completed."""
    lora: Params
    """Trainable LoRA tensors (float32), keyed by module parameter name."""
    opt: OptState
    """The optimizer's state: AdamW's moments, or Prodigy's (:mod:`qflux.optim.prodigy`)."""
    seed: int
    """Root of every random draw; with ``step`` it is the RNG position (draws are keyed by both)."""
    ema: Params | None = None
    """Exponential moving average of ``lora`` (``train.ema_decay``), or None."""


@attrs.frozen
class StepHParams:
    """Per-run constants of the update rule (the per-step lr comes in as a tensor)."""

    optimizer: Optimizer = attrs.field(factory=make_optimizer)
    """The update rule with its clipping and non-finite skip (:func:`qflux.optim.transform.make_optimizer`;
    AdamW, lr 1e-3-style defaults, max norm 1.0, unless given)."""
    engine: GradEngine = "func"
    """'func': torch.func.grad_and_value. 'autograd': torch.autograd.grad over fresh leaves, which
    also works with activation checkpointing (torch.func transforms do not)."""
    ema_decay: float | None = None
    """Decay of the LoRA's moving average kept in the state (:func:`qflux.optim.adamw.ema_update`), or None."""


def init_train_state(
    lora: Mapping[str, torch.Tensor],
    seed: int,
    *,
    ema: bool = False,
    optimizer: Optimizer | None = None,
) -> TrainState:
    """A step-0 state holding copies of ``lora`` and ``optimizer``'s fresh state (AdamW's by default;
    zero moments, Prodigy's d = d0), and, with ``ema``, the moving average starting at ``lora``."""
    params = {k: v.detach().clone() for k, v in lora.items()}
    average = {k: v.clone() for k, v in params.items()} if ema else None
    opt: OptState = (optimizer or make_optimizer()).init(params)
    return TrainState(step=0, lora=params, opt=opt, seed=seed, ema=average)


def opt_tensors(opt: OptState) -> list[torch.Tensor]:
    """Every tensor an optimizer state holds (for memory accounting)."""
    return [t for f in opt for t in (f.values() if isinstance(f, dict) else [f])]


def value_and_grad(
    loss_fn: LossFn, lora: Mapping[str, torch.Tensor], batch: Any, *, engine: GradEngine, module: Any = None
) -> tuple[torch.Tensor, Params]:
    """(loss, ∂loss/∂lora) for one batch, by the chosen engine; inputs are not modified.

    Args:
        module: for ``engine='autograd'``, the module ``loss_fn`` calls; the LoRA tensors stay
            substituted into it through backward, so recomputed (checkpointed) blocks see them.
    """
    if engine == "func":
        grads, loss = torch.func.grad_and_value(loss_fn)(dict(lora), batch)
        return loss.detach(), grads
    if module is None:
        raise ValueError("engine='autograd' needs the module that loss_fn calls (module=...)")
    leaves = {k: v.detach().requires_grad_(True) for k, v in lora.items()}

    def forward_and_backward() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        loss = loss_fn({}, batch)  # the module holds the leaves already: no second substitution
        # an adapter whose output is never used (unreached_adapters) gets a zero gradient, as under
        # torch.func.grad, so every engine, and every rank's all-reduce, sees the same tensors
        return loss, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)

    # the leaves stay substituted until backward has run (recomputed blocks see them too)
    params = {f"module.{k}": v for k, v in leaves.items()}
    with torch.enable_grad():
        loss, grads = functional_call(_Holding(module), params, (forward_and_backward,), strict=False)
    return loss.detach(), dict(zip(leaves, grads, strict=True))


def unreached_adapters(loss_fn: LossFn, lora: Mapping[str, torch.Tensor], batch: Any, module: Any) -> list[str]:
    """The adapter layers the loss does not reach: every one of their tensors gets an exactly zero gradient
    on ``batch`` (none at all where the output is never used, zero where it only reaches dropped rows, as
    the queries of a last block's discarded text stream). They keep their values, so a fresh adapter there
    keeps ΔW = 0. One forward and backward by the autograd engine, outside the step.

    Returns:
        The module paths (:func:`qflux.lora.kinds.module_of`) in ``lora``'s order.
    """
    _, grads = value_and_grad(loss_fn, lora, batch, engine="autograd", module=module)
    modules: dict[str, bool] = {}
    for name, g in grads.items():
        m = module_of(name)
        modules[m] = modules.get(m, True) and not bool(g.any())  # a host sync, once per run
    return [m for m, dead in modules.items() if dead]


class _Holding(nn.Module):
    """Holds ``module`` as a submodule and runs a function as its forward, so that
    ``torch.func.functional_call`` keeps tensors substituted into ``module`` for the whole function."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


Reduce = Callable[[Params, torch.Tensor], tuple[Params, torch.Tensor]]


def _update(
    lora: Params,
    opt: OptState,
    microbatches: list[Any],
    lr: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    loss_fn: LossFn,
    hp: StepHParams,
    module: Any,
    reduce: Reduce | None,
) -> tuple[Params, tuple[Any, ...], dict[str, torch.Tensor]]:
    """The pure core of a step (compilable: no Python state, no host syncs, tensors in and out).

    Returns:
        (lora, the optimizer state's fields, metrics).
    """
    k = len(microbatches)
    total_loss: torch.Tensor | None = None
    grads: Params = {}
    for m, batch in enumerate(microbatches):
        loss, g = value_and_grad(loss_fn, lora, batch, engine=hp.engine, module=module)
        w = weights[m] if weights is not None else None
        if w is not None:  # this micro-batch's share of the (global) step
            loss, g = loss.float() * w, {n: t * w.to(t.dtype) for n, t in g.items()}
        total_loss = loss.float() if total_loss is None else total_loss + loss.float()
        grads = g if not grads else {n: grads[n] + g[n] for n in grads}
    assert total_loss is not None, "train_step needs at least one micro-batch"
    if weights is None and k > 1:
        grads, total_loss = {n: t / k for n, t in grads.items()}, total_loss / k
    if reduce is not None:  # Σ over ranks of the weighted shares (qflux.train.distributed.all_reduce_sum)
        grads, total_loss = reduce(grads, total_loss)
    # clip, step, and keep the old state when the loss or the norm is not finite (on device: no host sync)
    stepped = hp.optimizer.update(grads, opt, lora, total_loss, lr)
    metrics = {"loss": total_loss, "grad_norm": stepped.grad_norm, "lr": stepped.lr.float(),
               "finite": stepped.finite.float()}  # fmt: skip
    return stepped.params, tuple(stepped.state), metrics


StepFn = Callable[..., tuple[TrainState, dict[str, torch.Tensor]]]


def make_train_step(
    loss_fn: LossFn,
    hp: StepHParams,
    *,
    module: Any = None,
    compile: bool | CompileMode = False,
    reduce: Reduce | None = None,
) -> StepFn:
    """Build ``step(state, microbatches, lr, weights=None) -> (state, metrics)``, optionally compiled.

    One optimizer step over K accumulated micro-batches:

        g = Σ_k w_k ∇ loss_fn(lora, batch_k)          (w_k = 1/K unless ``weights`` are given)
        g ← reduce(g);  g ← clip(g, max_grad_norm);   lora, opt ← AdamW or Prodigy(g, opt, lora, lr)

    A non-finite loss or gradient norm leaves the LoRA and optimizer state as they were (the step
    still counts, with ``finite`` = 0). The state is never mutated.

    Args:
        loss_fn: pure ``(lora, batch) -> 0-d loss``.
        module: the module ``loss_fn`` calls (needed by the autograd engine and regional compile).
        compile: ``'full'`` (or True) compiles the whole update (gradients, clipping, AdamW) with
            ``torch.compile(fullgraph=True)``; the lr is a tensor input, so changing it does not
            recompile. Needs the 'func' engine. ``'regional'`` compiles ``module``'s repeated
            blocks in place (:func:`compile_regions`) and needs the 'autograd' engine, which also
            recomputes checkpointed blocks. ``'none'`` (or False): eager.

    Returns:
        ``step``; its metrics are 0-d tensors: ``loss`` (mean over micro-batches), ``grad_norm``
        (before clipping), ``lr`` (Prodigy: its effective d·lr) and ``finite`` (1.0 when loss and gradient are finite).
        ``weights`` [K] (a tensor) replaces 1/K: data-parallel ranks weight each micro-batch by
        their share of the global batch, and ``reduce`` (an all-reduce SUM) adds the shares up.
    """
    mode: CompileMode = "full" if compile is True else "none" if compile is False else compile
    update = _compiled(partial(_update, loss_fn=loss_fn, hp=hp, module=module, reduce=reduce), mode, hp, module)

    def step(
        state: TrainState, microbatches: Sequence[Any], lr: torch.Tensor, weights: torch.Tensor | None = None
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        lora, fields, metrics = update(state.lora, state.opt, list(microbatches), lr, weights)
        opt = type(state.opt)(*fields)
        ema = state.ema
        if hp.ema_decay is not None:  # e ← d·e + (1 − d)·θ, from θ itself when the state has no average yet
            ema = ema_update(state.ema if state.ema is not None else lora, lora, hp.ema_decay)
        return attrs.evolve(state, step=state.step + 1, lora=lora, opt=opt, ema=ema), metrics

    return step


def _compiled(update: Callable[..., Any], mode: CompileMode, hp: StepHParams, module: Any) -> Callable[..., Any]:
    """``update`` as :func:`make_train_step`'s ``compile`` asks: the whole of it compiled, the
    module's repeated blocks compiled in place (regional), or as it is."""
    if mode == "full":
        if hp.engine != "func":
            raise ValueError(
                "compile='full' needs engine='func'; the autograd engine (gradient checkpointing) "
                "compiles with compile='regional'"
            )
        if module is not None and any(isinstance(m, (FrozenLinear, Float8FrozenLinear)) for m in module.modules()):
            raise ValueError(
                "compile='full' cannot trace FrozenLinear / Float8FrozenLinear layers (torch.compile of "
                "torch.func.grad drops gradients through custom autograd.Functions); build the module without them"
            )
        update = torch.compile(update, fullgraph=True, dynamic=False)
    elif mode == "regional":
        if hp.engine != "autograd" or module is None:
            raise ValueError("compile='regional' needs engine='autograd' and the module (module=...)")
        compile_regions(module)
    return update


def train_step(
    state: TrainState,
    microbatches: Sequence[Any],
    *,
    loss_fn: LossFn,
    lr: torch.Tensor,
    hp: StepHParams,
    module: Any = None,
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """One eager optimizer step; see :func:`make_train_step` (this builds and calls it once)."""
    return make_train_step(loss_fn, hp, module=module)(state, microbatches, lr)


@torch.no_grad()
def evaluate_loss(loss_fn: LossFn, lora: Mapping[str, torch.Tensor], batches: Sequence[Any]) -> torch.Tensor:
    """Mean of ``loss_fn`` over fixed batches (fixed noise and σ make it deterministic); 0-d."""
    losses = [loss_fn(dict(lora), b).float() for b in batches]
    return torch.stack(losses).mean()
