"""fp8 matmuls (``train.fp8_matmul``): the scaling maths against a dequantized reference, on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from qflux.config.errors import QfluxError
from qflux.weights.fp8 import FP8, Float8FrozenLinear, check_fp8_device, dequantize, quantize_rowwise, use_fp8_matmul


def test_rowwise_scales_map_each_row_amax_to_the_fp8_maximum() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(-3, 2, 48).unsqueeze(1)  # rows of very different ranges
    w8, s = quantize_rowwise(w)
    assert w8.dtype == FP8 and s.shape == (48, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s.squeeze(1), w.abs().amax(1) / 448.0, rtol=1e-6, atol=0)
    assert torch.equal(w8.float().abs().amax(1), torch.full((48,), 448.0))
    # e4m3 keeps 3 mantissa bits: every element within 2⁻⁴ relative (normal range) of the original
    deq = dequantize(w8, s, torch.float32)
    normal = w.abs() >= s * 2.0**-6
    assert ((deq - w).abs() <= w.abs() * 2.0**-4 + 1e-12)[normal].all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_equals_the_dequantized_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 96).to(dtype).requires_grad_(False)
    f8 = Float8FrozenLinear.from_linear(lin)
    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)
    y = f8(x)
    # reference: the same per-row activation quantization, dequantized operands, fp32 product
    x8, sx = quantize_rowwise(x.detach().reshape(-1, 64))
    ref = (x8.float() * sx) @ f8.dequantized(torch.float32).t() + lin.bias.float()
    torch.testing.assert_close(
        y.float().reshape(-1, 96), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3
    )
    # and close to the unquantized layer (fp8 error only)
    assert (y.float() - lin(x.detach()).float()).abs().max() < 0.05 * lin(x.detach()).float().abs().max()
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.float(), (g.float() @ f8.dequantized(torch.float32)), rtol=2e-2, atol=1e-2)
    assert f8.weight.element_size() == 1 and not f8.weight.requires_grad


def test_use_fp8_matmul_converts_large_frozen_layers_only() -> None:
    m = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 8), nn.Linear(512, 512))
    m[0].requires_grad_(False)
    m[1].requires_grad_(False)  # too narrow
    # m[2] is trainable: left alone
    assert use_fp8_matmul(m) == 1
    assert isinstance(m[0], Float8FrozenLinear) and type(m[1]) is nn.Linear and type(m[2]) is nn.Linear


def test_fp8_matmul_is_refused_on_cpu() -> None:
    with pytest.raises(QfluxError, match=r"train.fp8_matmul: true needs a CUDA GPU.*Set train.fp8_matmul: false"):
        check_fp8_device(torch.device("cpu"))
