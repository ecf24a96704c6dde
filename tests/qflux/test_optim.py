"""Pure AdamW and clipping against torch.optim.AdamW / clip_grad_norm_; schedules against diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers.optimization import get_scheduler
from hypothesis import given
from hypothesis import strategies as st

from qflux.optim.adamw import adamw_init, adamw_update, clip_by_global_norm
from qflux.optim.schedules import learning_rate


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(7, generator=g)}


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_trajectory_equals_torch_adamw(weight_decay: float) -> None:
    params = _params(0)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.AdamW(ref.values(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    state = adamw_init(params)
    lrs = [1e-2, 5e-3, 1e-2, 2e-3, 1e-2, 1e-2, 7e-3, 1e-2]
    for step, lr in enumerate(lrs):
        grads = _params(100 + step)
        for group in opt.param_groups:
            group["lr"] = lr
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        params, state = adamw_update(
            grads,
            state,
            params,
            lr=torch.tensor(lr, dtype=torch.float64),
            betas=(0.9, 0.99),
            eps=1e-8,
            weight_decay=weight_decay,
        )
        for k in params:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=2e-6, atol=1e-7)
    assert state.updates.item() == len(lrs)


@given(seed=st.integers(0, 1000), steps=st.integers(1, 4))
def test_lr_zero_is_identity(seed: int, steps: int) -> None:
    params = _params(seed)
    state = adamw_init(params)
    new = params
    for i in range(steps):
        new, state = adamw_update(
            _params(seed + i + 1), state, new, lr=torch.tensor(0.0), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1
        )
    for k in params:
        assert torch.equal(new[k], params[k])


def test_update_does_not_mutate_inputs() -> None:
    params, grads = _params(1), _params(2)
    state = adamw_init(params)
    before = ({k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in grads.items()})
    adamw_update(grads, state, params, lr=torch.tensor(0.1), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for k in params:
        assert torch.equal(params[k], before[0][k]) and torch.equal(grads[k], before[1][k])
        assert torch.equal(state.exp_avg[k], torch.zeros_like(params[k]))


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clip_matches_torch(max_norm: float) -> None:
    grads = _params(3)
    ref = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in grads.items()}
    for k, p in ref.items():
        p.grad = grads[k].clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), max_norm)
    clipped, norm = clip_by_global_norm(grads, max_norm)
    torch.testing.assert_close(norm, ref_norm)
    for k in grads:
        torch.testing.assert_close(clipped[k], ref[k].grad)


def test_no_clipping_when_disabled() -> None:
    grads = _params(4)
    clipped, _ = clip_by_global_norm(grads, None)
    assert all(torch.equal(clipped[k], grads[k]) for k in grads)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 5])
def test_schedules_match_diffusers(kind: str, warmup: int) -> None:
    total = 40
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    name = "constant_with_warmup" if kind == "constant" and warmup else kind
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        ours = learning_rate(step, base_lr=0.5, kind=kind, warmup_steps=warmup, total_steps=total)  # type: ignore[arg-type]
        assert ours == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()
