"""The fast frozen linear: same outputs and input gradients as ``nn.Linear``, same state dict."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qflux.weights.frozen_linear import (
    FrozenLinear,
    needs_fast_frozen_linear,
    prepare_frozen_base,
    use_fast_frozen_linear,
)


def _pair(n_in: int, n_out: int, bias: bool, dtype: torch.dtype) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    plain = nn.Linear(n_in, n_out, bias=bias).to(dtype).requires_grad_(False)
    fast = nn.Linear(n_in, n_out, bias=bias).to(dtype).requires_grad_(False)
    fast.load_state_dict(plain.state_dict())
    fast.__class__ = FrozenLinear
    return plain, fast


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 40), st.integers(1, 40), st.integers(1, 3), st.integers(1, 9), st.booleans()
)  # fmt: skip
def test_float32_output_and_input_gradient_equal_nn_linear(n_in: int, n_out: int, b: int, s: int, bias: bool) -> None:
    plain, fast = _pair(n_in, n_out, bias, torch.float32)
    x = torch.randn(b, s, n_in)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), fast(xb)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-6)
    assert plain.weight.grad is None and fast.weight.grad is None


def test_bfloat16_input_gradient_matches_the_fp32_product_as_closely_as_nn_linear() -> None:
    plain, fast = _pair(256, 1024, True, torch.bfloat16)
    x = torch.randn(2, 300, 256, dtype=torch.bfloat16)
    g = torch.randn(2, 300, 1024, dtype=torch.bfloat16)
    exact = g.float() @ plain.weight.float()  # ∂x in fp32
    grads = []
    for layer in (plain, fast):
        xi = x.clone().requires_grad_(True)
        layer(xi).backward(g)
        grads.append(xi.grad.float())
    err_plain, err_fast = ((gr - exact).abs().max().item() for gr in grads)
    assert err_fast <= max(err_plain, 1e-3) * 1.01  # the same bf16 product: rounding only


def test_conversion_only_where_it_matters_and_keeps_the_state_dict() -> None:
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(torch.bfloat16)
    m[0].requires_grad_(False)  # frozen; m[1] stays trainable
    before = {k: v.clone() for k, v in m.state_dict().items()}
    expected = 1 if needs_fast_frozen_linear(m[0].weight) else 0
    assert use_fast_frozen_linear(m) == expected
    assert type(m[1]) is nn.Linear
    assert m.state_dict().keys() == before.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    assert not needs_fast_frozen_linear(torch.zeros(1))  # float32 keeps nn.Linear
    assert prepare_frozen_base(nn.Linear(4, 4).requires_grad_(False), fp8_matmul=False, device=torch.device("cpu")) == {
        "fp8": 0,
        "fast_backward": 0,
        "4bit_trainable": 0,
    }
