"""The LoRA's exponential moving average: hypothesis checks of the update's identities, and the
average carried by the train step."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qflux.optim.adamw import ema_update
from qflux.optim.transform import make_optimizer
from qflux.train.state import StepHParams, init_train_state, make_train_step

shapes = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=3)


def _params(seed: int, sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(a, b, generator=g) for i, (a, b) in enumerate(sizes)}


@settings(max_examples=50, deadline=None)
@given(sizes=shapes, seed=st.integers(0, 2**16))
def test_decay_0_is_the_raw_weights(sizes, seed: int) -> None:  # type: ignore[no-untyped-def]
    ema, params = _params(seed, sizes), _params(seed + 1, sizes)
    out = ema_update(ema, params, 0.0)
    assert all(torch.equal(out[k], params[k]) for k in params)


@settings(max_examples=50, deadline=None)
@given(sizes=shapes, seed=st.integers(0, 2**16), decay=st.floats(0.0, 0.9999))
def test_constant_weights_are_a_fixed_point(sizes, seed: int, decay: float) -> None:  # type: ignore[no-untyped-def]
    params = _params(seed, sizes)
    out = ema_update({k: v.clone() for k, v in params.items()}, params, decay)
    for k in params:
        torch.testing.assert_close(out[k], params[k], rtol=0, atol=1e-6)


def test_the_step_carries_the_average() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    target = torch.tensor([1.0, -2.0, 3.0])

    def loss_fn(lora: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        return ((lora["w"] - batch) ** 2).sum()

    step = make_train_step(loss_fn, StepHParams(make_optimizer(max_grad_norm=None), ema_decay=0.9))
    state = init_train_state({"w": w.detach()}, seed=0, ema=True)
    ema = state.ema["w"].clone()  # type: ignore[index]
    for _ in range(3):
        state, _ = step(state, [target], torch.tensor(0.1))
        ema = 0.9 * ema + 0.1 * state.lora["w"]
        torch.testing.assert_close(state.ema["w"], ema)  # type: ignore[index]
    assert not torch.equal(state.ema["w"], state.lora["w"])  # type: ignore[index]
    plain = make_train_step(loss_fn, StepHParams(make_optimizer(max_grad_norm=None)))
    assert plain(init_train_state({"w": w.detach()}, seed=0), [target], torch.tensor(0.1))[0].ema is None
