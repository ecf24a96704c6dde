"""The pure Prodigy against the ``prodigyopt`` package it follows, and its invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prodigyopt import Prodigy

from qflux.optim.prodigy import ProdigyHParams, prodigy_init
from qflux.optim.transform import make_optimizer


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(6, 5, generator=g), "b": torch.randn(9, generator=g), "z": torch.zeros(3, 4)}


def _grads(seed: int, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """∇ of ½‖p − 3‖² plus noise: a consistent direction, so d grows."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v - 3.0) + 0.1 * torch.randn(v.shape, generator=g) for k, v in params.items()}


def _step(grads, state, params, lr: float, hp: ProdigyHParams, weight_decay: float = 0.0):
    opt = make_optimizer(
        "prodigy", betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, max_grad_norm=None, prodigy=hp
    )
    return opt.update(grads, state, params, torch.tensor(1.0), torch.tensor(lr, dtype=torch.float64))


@pytest.mark.parametrize(
    ("weight_decay", "hp"),
    [
        (0.0, ProdigyHParams()),
        (0.01, ProdigyHParams(d_coef=0.5, use_bias_correction=True)),
        (0.0, ProdigyHParams(d0=1e-4, safeguard_warmup=True, growth_rate=1.5)),
    ],
)
def test_twenty_steps_equal_prodigyopt(weight_decay: float, hp: ProdigyHParams) -> None:
    params = _params(0)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = Prodigy(
        ref.values(),
        lr=1.0,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=weight_decay,
        d0=hp.d0,
        d_coef=hp.d_coef,
        use_bias_correction=hp.use_bias_correction,
        safeguard_warmup=hp.safeguard_warmup,
        growth_rate=hp.growth_rate,
    )
    state = prodigy_init(params, d0=hp.d0)
    lrs = [0.0, 0.5, *([1.0] * 18)]  # a warmup step at lr = 0 (prodigyopt: nothing happens)
    for step, lr in enumerate(lrs):
        grads = _grads(100 + step, {k: p.detach() for k, p in ref.items()})
        opt.param_groups[0]["lr"] = lr
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        params, state, _, ok, _ = _step(grads, state, params, lr, hp, weight_decay)
        assert bool(ok)
        for k in params:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-6, atol=1e-6)
        group = opt.param_groups[0]
        assert state.d.item() == pytest.approx(group["d"], rel=1e-6)
        assert state.d_max.item() == pytest.approx(group["d_max"], rel=1e-6)
        assert state.updates.item() == group["k"]
    assert state.d.item() > hp.d0 * 2  # the estimate grew: the comparison covered a moving d


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), steps=st.integers(1, 4), safeguard=st.booleans())
def test_lr_zero_changes_nothing(seed: int, steps: int, safeguard: bool) -> None:
    hp = ProdigyHParams(safeguard_warmup=safeguard)
    params = _params(seed)
    state0 = state = prodigy_init(params)
    new = params
    for i in range(steps):
        new, state, _, _, dlr = _step(_grads(seed + i + 1, params), state, new, 0.0, hp, weight_decay=0.1)
        assert dlr.item() == 0.0
    for k in params:
        assert torch.equal(new[k], params[k])
    for a, b in zip(state, state0, strict=True):
        if isinstance(a, dict):
            assert all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(a, b)


def test_non_finite_loss_keeps_state() -> None:
    params = _params(1)
    state = prodigy_init(params)
    opt = make_optimizer("prodigy", betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                         prodigy=ProdigyHParams())  # fmt: skip
    new, state2, _, ok, _ = opt.update(_grads(2, params), state, params, torch.tensor(float("nan")), torch.tensor(1.0))
    assert not bool(ok)
    assert all(torch.equal(new[k], params[k]) for k in params)
    assert torch.equal(state2.d, state.d) and torch.equal(state2.updates, state.updates)


@pytest.mark.compile
def test_prodigy_compiles_in_the_step_as_one_graph_equal_to_eager() -> None:
    """The whole step (gradient, clipping, Prodigy) as one graph, lr changing (0 included) without a
    recompile, and the same trajectory as eager."""
    from torch._dynamo.utils import counters

    from qflux.train.state import StepHParams, init_train_state, make_train_step

    torch._dynamo.reset()
    counters.clear()

    def loss_fn(lora, batch):  # type: ignore[no-untyped-def]
        return ((lora["w"] @ batch - 3.0) ** 2).mean() + (lora["b"] ** 2).sum()

    hp = StepHParams(make_optimizer("prodigy", prodigy=ProdigyHParams(use_bias_correction=True)))
    eager, compiled = make_train_step(loss_fn, hp), make_train_step(loss_fn, hp, compile=True)
    lora = {"w": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(3)}
    se = sc = init_train_state(lora, seed=0, optimizer=hp.optimizer)
    batch = torch.randn(5, 2, generator=torch.Generator().manual_seed(10))
    for lr in [0.0, 0.5, 1.0, 1.0, 0.8, 1.0, 1.0, 1.0]:
        lr_t = torch.tensor(lr, dtype=torch.float64)
        se, me = eager(se, [batch], lr_t)
        sc, mc = compiled(sc, [batch], lr_t)
        torch.testing.assert_close(mc["lr"], me["lr"], rtol=1e-6, atol=0)
        for k in se.lora:
            torch.testing.assert_close(sc.lora[k], se.lora[k], rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    assert isinstance(sc.opt, type(se.opt)) and sc.opt.d.item() > 1e-6
